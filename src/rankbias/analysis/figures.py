"""The paper's seven figures, fig8 (a convolutional network's rank), the theory's two
(figT1, figT2) and two summary figures, drawn from stored runs.

Every figure is drawn from whatever subset of its runs exists (missing runs are
listed as a warning and noted on the figure). Ranks come from the stored spectra with
the config's ``rank: {normalise, tol}``, so re-thresholding never retrains. A run
that diverged is drawn up to its last finite value, marked with a cross there and
labelled "diverged at epoch e"; it is never dropped silently. Several seeds of one
setting are drawn as their mean with a band from min to max. A run that fails
verification (``Run.verify``) stops the figure, named in the error.

Lines that lie exactly on one another (the same values in a panel) get hollow markers
of their own shape and size and say so in the legend; the legend sits beside the
top-right panel, clear of the title, and notes go in a caption under the panels.

The summary figures need no config section of their own: figR (final rank against the
rank tolerance) is drawn from every paper figure's runs, a panel per figure; figS
(final relative rank, rank / largest possible rank, against B/(eta*lambda), Theorem 1's
ratio) from every run of the config.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from rankbias.store import metrics as M
from rankbias.plan import sweep
from rankbias.store.results import Run, refuse_unverified
from rankbias.analysis.plotting import (MARKERS, SYMBOL, Line, caption, fmt, legend, line_colors, line_styles,
                                       mark_coincident, palette, plot_series)
from rankbias.plan.sweep import LAYOUTS, NAMES, SUMMARY, figure_names, figure_runs  # noqa: F401 (the catalogue)
from rankbias.analysis import theory_figures
from rankbias.store import provenance

# figR's tolerance axis and the tolerances in use: the paper's text, the authors' code
# and their plotting notebooks (conv nets).
TOLERANCES = np.logspace(-5, -1, 41)
MARKED_TOLERANCES = {1e-4: "the paper's text", 1e-3: "the authors' code",
                     0.04: "the authors' notebooks (conv nets)"}
TOLERANCE_TAGS = {1e-4: "paper", 1e-3: "code", 0.04: "notebooks"}
DESCRIBE_KEYS = ("lr", "batch_size", "weight_decay", "momentum", "loss", "epochs")
# Keys that identify a line apart from the layout's own (seed is averaged over).
IGNORED = {"seed"}


@dataclass
class RunData:
    """What a figure needs from one run, ranks already thresholded."""
    run: Run
    spec: dict
    metrics: pd.DataFrame        # epoch-indexed: train_acc, train_loss, test_acc, distance
    mean_rank: pd.Series         # logged epoch -> average hidden rank (NaN once diverged)
    final_layers: pd.DataFrame   # hidden matrices at the last finite logged epoch: layer, index, rank
    diverged_epoch: int | None


def load_run(run: Run, normalise: str = M.DEFAULT_NORMALISE, tol: float = M.DEFAULT_TOL,
             conv: str = M.DEFAULT_CONV, measure: str = M.DEFAULT_MEASURE) -> RunData:
    spec = run.spec.to_dict()
    spec["model"] = run.spec.model
    metrics = run.metrics.set_index("epoch").sort_index()
    mean_rank, final = run.hidden_ranks(normalise, tol, finite_last=True, conv=conv, measure=measure)
    div = run.info.get("diverged")
    return RunData(run, spec, metrics, mean_rank, final,
                   None if div is None else int(div.get("epoch", -1)))


def _varying(data: Sequence[RunData]) -> list[str]:
    keys = sorted({k for d in data for k in d.spec} - IGNORED - {"arch", "depth", "width"})
    return [k for k in keys if len({repr(d.spec.get(k)) for d in data}) > 1]


def group(data: Sequence[RunData], panel: str | None, line: str) -> dict[Any, list[Line]]:
    """Panels (by `panel` value) of lines (by `line` and any other varying key)."""
    varying = _varying(data)
    extra = [k for k in varying if k not in (panel, line)]
    line_keys = [line] + extra
    panels: dict[Any, dict[tuple, list[RunData]]] = {}
    for d in data:
        pv = d.spec.get(panel) if panel else None
        lk = tuple(d.spec.get(k) for k in line_keys)
        panels.setdefault(pv, {}).setdefault(lk, []).append(d)
    out = {}
    for pv in sorted(panels, key=lambda v: (v is None, v)):
        lines = []
        for lk in sorted(panels[pv], key=lambda t: tuple(map(str, t[1:])) + (t[0],)):
            members = sorted(panels[pv][lk], key=lambda d: d.spec["seed"])
            label = ", ".join(fmt(k, v) for k, v in zip(line_keys, lk))
            seeds = [m.spec["seed"] for m in members]
            if len(seeds) > 1:
                label += f" ({len(seeds)} seeds)"
            for m in members:
                if m.diverged_epoch is not None:
                    label += f" — diverged at epoch {m.diverged_epoch}" + (
                        f" (seed {m.spec['seed']})" if len(seeds) > 1 else "")
            lines.append(Line(lk, label, members))
        out[pv] = lines
    return out


def _title(name: str, data: Sequence[RunData], layout: dict) -> str:
    if not data:
        return f"{name}: no runs yet"
    first = data[0].spec
    varying = set(_varying(data)) | {layout["line"], layout.get("panel")}
    models = sorted({d.spec["model"] for d in data})
    datasets = sorted({d.spec["dataset"] for d in data})
    fixed = [fmt(k, first[k]) for k in DESCRIBE_KEYS if k not in varying and k in first]
    return (f"{name.replace('fig', 'Figure ')}: {', '.join(models)} on {', '.join(datasets)}"
            + (f" ({', '.join(fixed)})" if fixed else ""))


def _layer_series(m: RunData) -> tuple[pd.Series, dict[int, str]]:
    """A run's final rank per hidden matrix, at x = 1, 2, ..., and the matrices' names."""
    fl = m.final_layers
    x = np.arange(1, len(fl) + 1)
    return (pd.Series(fl["rank"].to_numpy(float), index=x),
            {int(i): str(nm) for i, nm in zip(x, fl["layer"])})


def draw(name: str, data: Sequence[RunData], missing: Sequence[str] = ()):
    """A matplotlib Figure of `name` (fig1..fig8, figT1, figT2) from the loaded runs."""
    from matplotlib.figure import Figure

    if name not in LAYOUTS:
        raise ValueError(f"figure: {name!r} is not one of {', '.join(LAYOUTS)}")
    layout = LAYOUTS[name]
    kind, panel, line = layout["kind"], layout["panel"], layout["line"]
    panels = group(data, panel, line) if data else {None: []}
    all_lines = [ln for lines in panels.values() for ln in lines]
    colors, styles = line_colors(all_lines), line_styles(all_lines)
    kws: dict[str, dict] = {}
    if kind in ("dynamics", "rank", "rank_acc"):
        kws = mark_coincident(panels, lambda pv, ln: [m.mean_rank for m in ln.members], panel)
    elif kind == "layers":
        kws = mark_coincident(panels, lambda pv, ln: [_layer_series(m)[0] for m in ln.members], panel)

    if kind in ("lemmas", "theorem1"):
        fig = Figure(figsize=(15, 5), layout="constrained")
        markers = {r: MARKERS[i % len(MARKERS)] for i, r in enumerate(sorted({ln.key[1:] for ln in all_lines},
                                                                             key=str))}
        extra = [k for k in (_varying(data) if data else []) if k not in (panel, line)]
        theory_figures.draw(fig, kind, all_lines, colors, markers,
                            ", ".join(SYMBOL.get(k) or k for k in extra))
    elif kind == "dynamics":
        fig = Figure(figsize=(15, 4.2), layout="constrained")
        axes = fig.subplots(1, 4)
        lines = all_lines
        cols = [("distance", "d(W_t, W_t+1)", True), ("train_acc", "train accuracy", False),
                ("train_loss", "train loss", True), (None, "average rank", False)]
        for ax, (col, ylabel, logy), letter in zip(axes, cols, "abcd"):
            for ln in lines:
                if col is None:
                    series = [m.mean_rank for m in ln.members]
                else:
                    series = [m.metrics[col] if col in m.metrics else pd.Series(dtype=float)
                              for m in ln.members]
                plot_series(ax, ln, series, colors[ln.key[0]], styles[ln.key[1:]],
                             positive=logy, **kws.get(ln.label, {}))
            if logy:
                ax.set_yscale("log")
                lo, hi = ax.get_ylim()
                if hi <= lo * (1 + 1e-9):       # one value throughout: a decade around it,
                    ax.set_ylim(lo / 3, hi * 3)  # not a range of 1e-16 with runaway ticks
            ax.set_xlabel("epoch")
            ax.set_ylabel(ylabel)
            ax.set_title(f"({letter}) {ylabel}")
            ax.grid(alpha=0.3)
        legend(fig)
    else:
        n = len(panels)
        rows = 2 if kind == "rank_acc" else 1
        fig = Figure(figsize=(max(7.5, 4.2 * n + 2.5), 3.6 * rows + 0.6), layout="constrained")
        axes = np.atleast_2d(fig.subplots(rows, n, squeeze=False))
        for j, (pv, lines) in enumerate(panels.items()):
            ax = axes[0, j]
            if kind in ("rank", "rank_acc"):
                for ln in lines:
                    plot_series(ax, ln, [m.mean_rank for m in ln.members], colors[ln.key[0]],
                                 styles[ln.key[1:]], **kws.get(ln.label, {}))
                ax.set_xlabel("epoch")
                ax.set_ylabel("average rank")
            else:
                names: dict[int, str] = {}
                for ln in lines:
                    series = []
                    for m in ln.members:
                        one, named = _layer_series(m)
                        names.update(named)
                        series.append(one)
                    style = styles[ln.key[1:]]
                    plot_series(ax, ln, series, colors[ln.key[0]],
                                 style + "o" if len(style) == 1 else style, **kws.get(ln.label, {}))
                if names:
                    ax.set_xticks(sorted(names), [names[i] for i in sorted(names)],
                                  rotation=45, ha="right", fontsize=8)
                ax.set_xlabel("layer")
                ax.set_ylabel("rank at the end of training")
            if pv is not None:
                ax.set_title(fmt(panel, pv))
            ax.grid(alpha=0.3)
            if kind == "rank_acc":
                ax2 = axes[1, j]
                for ln in lines:
                    c = colors[ln.key[0]]
                    for col, style in (("train_acc", "-"), ("test_acc", "--")):
                        series = [m.metrics[col] if col in m.metrics else pd.Series(dtype=float)
                                  for m in ln.members]
                        plot_series(ax2, ln, series, c, style, label=False)
                ax2.set_xlabel("epoch")
                ax2.set_ylabel("accuracy (train solid, test dashed)")
                ax2.grid(alpha=0.3)
        legend(fig)
    title = _title(name, data, layout)
    if missing:
        title += f"\n{len(missing)} of {len(missing) + len(data)} runs not available yet"
    fig.suptitle(title, fontsize=11)
    return fig


# -- summary figures -------------------------------------------------------------------

def final_rank_by_tolerance(d: RunData, normalise: str, tols: Sequence[float] | np.ndarray) -> pd.Series:
    """Average hidden-matrix rank at the run's last finite logged epoch, at each tolerance
    (empty when the run has no finite logged epoch)."""
    finite = d.mean_rank.dropna()
    if finite.empty or d.final_layers.empty:
        return pd.Series(dtype=float)
    spectra = d.run.spectra
    row = int(np.flatnonzero(spectra["epochs"] == int(finite.index.max()))[0])
    svs = [spectra[f"sv_{int(i)}"][row] for i in d.final_layers["index"]]
    ranks = [np.mean([M.rank(sv, normalise, tol) for sv in svs]) for tol in tols]
    return pd.Series(np.asarray(ranks, dtype=float), index=np.asarray(tols, dtype=float))


def draw_rank_vs_tolerance(by_figure: dict[str, list[RunData]], normalise: str,
                           missing: Sequence[str] = ()):
    """figR: a panel per paper figure, a line per setting (mean over seeds, min-max band)."""
    from matplotlib.figure import Figure
    from matplotlib.transforms import ScaledTranslation

    names = [n for n in LAYOUTS if n in by_figure] or ["none"]
    cols = min(4, len(names))
    rows = -(-len(names) // cols)

    def n_lines(name: str) -> int:
        layout = LAYOUTS.get(name, {"panel": None, "line": "batch_size"})
        data = by_figure.get(name, [])
        return sum(len(v) for v in group(data, layout["panel"], layout["line"]).values()) if data else 0

    # each row as tall as its panels plus its longest legend (about 0.15 in an entry at 6 pt)
    legend_in = [0.15 * max(n_lines(n) for n in names[r * cols:(r + 1) * cols]) for r in range(rows)]
    fig = Figure(figsize=(4.4 * cols, 3.4 * rows + sum(legend_in) + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[len(names):]:
        ax.set_axis_off()
    for ax, name in zip(axes, names):
        data = by_figure.get(name, [])
        layout = LAYOUTS.get(name, {"panel": None, "line": "batch_size"})
        lines = [ln for lns in group(data, layout["panel"], layout["line"]).values() for ln in lns] \
            if data else []
        panel = layout["panel"]
        if panel and len({m.spec.get(panel) for m in data}) > 1:
            lines = [Line(ln.key, f"{fmt(panel, ln.members[0].spec.get(panel))}, {ln.label}", ln.members)
                     for ln in lines]
        curves = {id(ln): [final_rank_by_tolerance(m, normalise, TOLERANCES) for m in ln.members]
                  for ln in lines}
        def curve(pv: Any, ln: Line, c: dict = curves) -> list[pd.Series]:
            return c[id(ln)]
        kws = mark_coincident({None: lines}, curve)
        for ln, color in zip(lines, palette(len(lines))):
            plot_series(ax, ln, curves[id(ln)], color, **kws.get(ln.label, {}))
        for tol in MARKED_TOLERANCES:
            ax.axvline(tol, color="0.4", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlim(TOLERANCES[0], TOLERANCES[-1])
        # the tolerances in use named above the panel, clear of the curves
        top = ax.secondary_xaxis("top")
        top.set_xticks(list(MARKED_TOLERANCES), [TOLERANCE_TAGS[t] for t in MARKED_TOLERANCES], fontsize=7)
        top.tick_params(length=3, pad=1)
        top.minorticks_off()
        ax.set_xlabel("rank tolerance ε")
        ax.set_ylabel("average rank at the end of training")
        models = sorted({d.spec["model"] for d in data})
        ax.set_title(f"{name.replace('fig', 'Figure ')}: {', '.join(models) or 'no runs'}", fontsize=9)
        ax.grid(alpha=0.3)
        if lines:       # below the panel's axis label, clear of the curves
            ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                      bbox_transform=ax.transAxes + ScaledTranslation(0, -0.5, fig.dpi_scale_trans))
    caption(fig, "dotted: the tolerances in use: " + "; ".join(
        f"{tol:g}, {who}" for tol, who in MARKED_TOLERANCES.items()))
    title = f"Final rank vs tolerance (normalise={normalise})"
    if missing:
        title += f"\n{len(missing)} runs not available yet"
    fig.suptitle(title, fontsize=11)
    return fig


def theorem1_ratio(spec: dict) -> float:
    """B / (eta * lambda): Theorem 1's bound on the rank grows with it (inf at lambda = 0)."""
    wd = spec["weight_decay"]
    return spec["batch_size"] / (spec["lr"] * wd) if wd > 0 else float("inf")


def relative_rank(d: RunData) -> float:
    """The run's final rank relative to the largest possible: the mean over its hidden
    matrices (at the last finite logged epoch) of rank / min(matrix shape), in [0, 1], so
    that networks of any width compare (NaN when the run has no finite logged epoch)."""
    if d.final_layers.empty:
        return float("nan")
    spectra = d.run.spectra
    full = [spectra[f"sv_{int(i)}"].shape[1] for i in d.final_layers["index"]]
    return float(np.mean(d.final_layers["rank"].to_numpy(float) / np.asarray(full, float)))


def draw_rank_vs_ratio(data: Sequence[RunData], missing: Sequence[str] = ()):
    """figS: every run's final relative rank (rank / largest possible rank, averaged over
    the hidden matrices) against B/(eta*lambda), a colour and marker per model; runs with
    lambda = 0 (ratio infinite) and diverged runs are counted in the title."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 5.0), layout="constrained")
    ax = fig.subplots()
    models = sorted({d.spec["model"] for d in data})
    colors = dict(zip(models, palette(len(models))))
    n_zero = n_div = 0
    for model in models:
        xs, ys = [], []
        for d in data:
            if d.spec["model"] != model:
                continue
            if d.diverged_epoch is not None:
                n_div += 1
                continue
            x = theorem1_ratio(d.spec)
            if not np.isfinite(x):
                n_zero += 1
                continue
            y = relative_rank(d)
            if np.isfinite(y):
                xs.append(x)
                ys.append(y)
        ax.scatter(xs, ys, color=colors[model], label=f"{model} ({len(xs)} runs)", s=30, alpha=0.8,
                   marker=MARKERS[models.index(model) % len(MARKERS)], edgecolors="none")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("B / (η·λ)")
    ax.set_ylabel("relative rank at the end of training")
    ax.grid(alpha=0.3, which="both")
    if models:          # beside the panel, clear of the points
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    caption(fig, "relative rank: a hidden matrix's rank / its largest possible rank (its smaller side), "
                 "averaged over the network")
    title = "Final rank vs B/(η·λ): Theorem 1 predicts rank grows with B and falls with ηλ"
    notes = [f"{n_zero} run(s) with λ = 0 not shown" if n_zero else "",
             f"{n_div} diverged run(s) not shown" if n_div else "",
             f"{len(missing)} run(s) not available yet" if missing else ""]
    notes = [n for n in notes if n]
    fig.suptitle(title + ("\n" + "; ".join(notes) if notes else ""), fontsize=10)
    return fig


# -- runs and the command ------------------------------------------------------------

def collect(runs_dir: str | Path, run_ids: Sequence[str], normalise: str, tol: float,
            what: str = "figure", conv: str = M.DEFAULT_CONV,
            measure: str = M.DEFAULT_MEASURE) -> tuple[list[RunData], list[str]]:
    """Load the runs that exist; return them and the run_ids that do not. A run that
    fails verification (an edited record, an altered file) is an error naming it:
    nothing is drawn from it, and it is not passed off as missing either."""
    runs, missing = [], []
    for rid in run_ids:
        path = Path(runs_dir) / rid
        if (path / "run.json").exists():
            runs.append(Run(path))
        else:
            missing.append(rid)
    refuse_unverified(runs, what)
    return [load_run(run, normalise, tol, conv, measure) for run in runs], missing


def output_paths(png: str | Path, pdf: str | Path | None = None, record: str | Path | None = None,
                 page: str | Path | None = None) -> dict[str, Path]:
    """Where a figure's files go: the PNG, the PDF (`pdf`, else beside the PNG) and the
    PNG's provenance sidecar and page, which lie beside it under its stem (where
    `rankbias audit` looks): a `record` or `page` given (the workflow passes each declared
    output) other than those is a ValueError naming the option and what was expected."""
    png = Path(png)
    paths = {"png": png, "pdf": Path(pdf) if pdf else png.with_suffix(".pdf"),
             "provenance": provenance.sidecar_path(png), "page": provenance.page_path(png)}
    for option, kind, given in (("--provenance", "provenance", record), ("--page", "page", page)):
        if given and Path(given) != paths[kind]:
            raise ValueError(f"{option} {given}: expected {paths[kind]}, beside --out {png} "
                             f"(where `rankbias audit` looks for it)")
    return paths


def make_figure(name: str, config_path: str | Path, runs_dir: str | Path, out: str | Path,
                pdf: str | Path | None = None) -> dict:
    """Draw figure `name` from the runs of `config_path` in `runs_dir` and write it as the
    PNG `out` and the PDF `pdf` (else beside the PNG), with its provenance."""
    where = output_paths(out, pdf)
    p = sweep.plan_from_file(config_path)
    if name not in figure_names(p):
        raise ValueError(f"figure: {name!r} is not configured in {config_path} "
                         f"(figures: {', '.join(figure_names(p)) or 'none'})")
    rank = sweep.figure_rank(p.config, name) if name in p.config["figures"] else dict(p.config["rank"])
    run_ids = figure_runs(p, name)
    data, missing = collect(runs_dir, run_ids, rank["normalise"], rank["tol"], name, rank["conv"],
                            rank.get("measure", M.DEFAULT_MEASURE))
    if missing:
        print(f"warning: {name}: {len(missing)} of {len(run_ids)} runs missing in "
              f"{runs_dir}: {', '.join(missing)}", file=sys.stderr)
    if name == "figR":
        loaded = {d.run.run_id: d for d in data}
        by_figure = {f: [loaded[r] for r in ids if r in loaded] for f, ids in p.figures.items()}
        fig = draw_rank_vs_tolerance(by_figure, rank["normalise"], missing)
    elif name == "figS":
        fig = draw_rank_vs_ratio(data, missing)
    else:
        fig = draw(name, data, missing)
    if name in SUMMARY:
        section = {"rank": rank, "figures": p.config["figures"], "extra": p.config["extra"],
                   "defaults": p.config["defaults"], "missing_runs": missing}
    else:
        section = {"rank": rank, "figure": p.config["figures"][name], "defaults": p.config["defaults"],
                   "missing_runs": missing}
    _save(fig, where["png"], where["pdf"], [d.run for d in data], section, name)
    return {"figure": name, "png": str(where["png"]), "pdf": str(where["pdf"]), "runs": len(data),
            "missing": missing,
            "diverged": [d.run.run_id for d in data if d.diverged_epoch is not None]}


def _save(fig, png: Path, pdf: Path, runs: list[Run], section: dict, name: str) -> None:
    prov = provenance.figure_provenance(runs, section, name)
    provenance.save_figure(fig, png, pdf, prov)


def register(subparsers) -> None:
    p = subparsers.add_parser("figure", help="draw one of the paper's figures from stored runs",
                              description="Draw fig1..fig8, figT1 or figT2, or a summary figure (figR: "
                                          "final rank vs tolerance; figS: final rank vs B/(eta*lambda)), "
                                          "from the runs in --runs (PNG and PDF, with provenance).")
    p.add_argument("name", choices=list(NAMES), help="which figure")
    p.add_argument("--config", default="config/config.yaml", help="config file (default: %(default)s)")
    p.add_argument("--runs", default="results/runs", help="runs directory (default: %(default)s)")
    p.add_argument("--out", help="PNG path; the PDF goes beside it (default: results/figures/NAME.png)")
    p.add_argument("--pdf", default=None, metavar="FILE", help="PDF path (default: beside the PNG)")
    p.add_argument("--provenance", default=None, metavar="FILE",
                   help="the provenance record's path, checked: it is the PNG's sidecar, "
                        "<PNG stem>.provenance.json beside it")
    p.add_argument("--page", default=None, metavar="FILE",
                   help="the provenance page's path, checked: <PNG stem>.provenance.html beside the PNG")
    p.set_defaults(func=_cmd_figure)


def _cmd_figure(args: argparse.Namespace) -> int:
    out = args.out or f"results/figures/{args.name}.png"
    output_paths(out, args.pdf, args.provenance, args.page)   # before anything is drawn
    r = make_figure(args.name, args.config, args.runs, out, args.pdf)
    note = f", {len(r['missing'])} missing" if r["missing"] else ""
    note += f", {len(r['diverged'])} diverged" if r["diverged"] else ""
    print(f"{args.name}: {r['png']} and {r['pdf']} from {r['runs']} run(s){note}")
    return 0
