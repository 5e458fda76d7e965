"""Measured verdicts on the paper's claims C1-C7, its theory T1-T3 (rankbias.train.theory) and
checks beyond the paper that later work asks for (R1-R3), from whatever runs exist.

Each claim gets a verdict -- ``holds``, ``fails`` or ``insufficient`` (not enough
runs of the right kind to judge) -- with the effect measured, the runs and seeds it
rests on and the thresholds used. Ranks are read off the stored spectra with the
config's ``rank`` settings. Diverged runs are counted and excluded.

"Final rank" is a run's average hidden-matrix rank at its last logged epoch;
"relative rank" divides it by the same run's average rank at epoch 0. What a rank is
follows the config's ``rank.measure`` (rankbias.store.metrics.rank_measure); the claims table
also judges C1-C3, R1 and R3 under each convention (``CONVENTIONS``), from the same stored
spectra, and says whether the verdicts agree. A group whose
final ranks differ by less than ``flat`` (relative range) shows no effect: it counts
as an effect of 0.

Every claim's effect is measured per group (or run) and seed, averaged per seed, and
given a two-sided Student t interval of the mean over the per-seed effects: groups
trained from one seed share its initialisations and data orders, so only seeds are
independent replicates. A claimed effect holds only when its interval excludes no
effect; a claimed absence holds only when its interval lies within the threshold. With
fewer than ``min_seeds`` seeds (default 3) there is no interval and the verdict is
``insufficient``, naming the seeds there are.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from rankbias.store import metrics as M
from rankbias.analysis import theory_verdicts
from rankbias.store.results import Run
from rankbias.core.io import atomic_write_set, json_bytes
from rankbias.core import config
from rankbias.core.spec import NUM_CLASSES, RunSpec
from rankbias.store import provenance
from rankbias.plan import sweep
from rankbias.store.results import load_runs, refuse_unverified

HOLDS, FAILS, INSUFFICIENT = "holds", "fails", "insufficient"

# What each threshold means, its default and bounds: rankbias.core.config.ClaimKeys.
DEFAULT_THRESHOLDS: dict[str, float] = config.defaults(config.ClaimKeys)

STATEMENTS = {
    "C1": "Smaller batch size gives lower rank (weight decay and learning rate fixed).",
    "C2": "Larger learning rate gives lower rank.",
    "C3": "Larger weight decay gives lower rank; with weight decay 0 there is no rank reduction.",
    "C4": "With weight decay > 0 SGD does not converge: d(W_t, W_t+1) stays bounded below; "
          "with weight decay 0 it is much smaller.",
    "C5": "Very low rank hurts training accuracy; the rank bias has a marginal effect on "
          "generalisation.",
    "C6": "MLPs learn a bottleneck (middle layers lower rank than the first and last); "
          "ResNets balance rank across blocks.",
    "C7": "Full-batch gradient descent does not reduce rank (except on tiny data).",
    "R1": "Rank floor: in the runs with the strongest rank bias, every hidden matrix keeps rank "
          "at or above the number of classes minus one.",
    "R2": "Full-batch gradient descent with weight decay, run until d(W_t, W_t+1) has flattened "
          "(a stationary point), does reduce rank, contrary to C7's reading.",
    "R3": "Label noise lowers the rank without weight decay: with weight decay 0, SGD on labels "
          "redrawn at random with probability p > 0 ends at a lower rank than on the true labels.",
}

# Checks beyond the paper: the later work each one comes from.
BEYOND_PAPER = {
    "R1": "Zangrando et al., Neural rank collapse: weight decay and small within-class "
          "variability yield low-rank bias, arXiv 2402.03991",
    "R2": "Kuzborskij & Abbasi-Yadkori, Low-rank bias, weight decay, and model merging in "
          "neural networks, arXiv 2502.17340",
    "R3": "Varre, Sagitova & Flammarion, SGD vs GD: rank deficiency in linear networks, "
          "NeurIPS 2024 (label-noise SGD lowers rank with no weight decay)",
}
# The claims that judge runs trained with label noise; every other claim is about SGD on
# the true labels and judges only those (label_noise 0).
LABEL_NOISE_CLAIMS = ("R3",)

# The claims each of the paper's figures shows (the paper's own attribution).
FIGURE_CLAIMS = {
    "fig1": ("C4",),
    "fig2": ("C1", "C2"),
    "fig3": ("C3",),
    "fig4": ("C1", "C2"),
    "fig5": ("C1", "C2", "C5"),
    "fig6": ("C6",),
    "fig7": ("C6",),
    "figT1": ("T1", "T2"),
    "figT2": ("T3",),
}


# -- numerics ------------------------------------------------------------------------

def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties given their average rank."""
    return pd.Series(x, dtype=float).rank(method="average").to_numpy()


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation; NaN when either side is constant or n < 2.

    DataFrame.corr computes it without scipy (Series.corr(method="spearman") needs it)."""
    if len(x) != len(y):
        raise ValueError("spearman: x and y differ in length")
    if len(x) < 2:
        return float("nan")
    df = pd.DataFrame({"x": np.asarray(x, dtype=float), "y": np.asarray(y, dtype=float)})
    return float(df.corr(method="spearman").iloc[0, 1])


# -- run summaries ---------------------------------------------------------------------

@dataclass
class RunSummary:
    run_id: str
    spec: dict
    diverged: dict | None
    initial_rank: float
    final_rank: float
    final_layers: list[tuple[str, float]]      # hidden matrices at the last logged epoch
    metrics: pd.DataFrame

    @property
    def relative_rank(self) -> float:
        return self.final_rank / self.initial_rank if self.initial_rank > 0 else float("nan")

    def final(self, col: str) -> float:
        if col not in self.metrics:
            return float("nan")
        s = self.metrics[col].dropna()
        return float(s.iloc[-1]) if len(s) else float("nan")

    def train_size(self) -> int:
        return RunSpec.from_dict(self.spec).sizes()[0]


def summarise(run: Run, normalise: str, tol: float, conv: str = M.DEFAULT_CONV,
              measure: str = M.DEFAULT_MEASURE) -> RunSummary:
    mean, fl = run.hidden_ranks(normalise, tol, finite_last=False, conv=conv, measure=measure)
    last = int(mean.index.max())
    return RunSummary(run.run_id, run.spec.to_dict(), run.info.get("diverged"),
                      float(mean.iloc[0]), float(mean.loc[last]),
                      [(str(n), float(r)) for n, r in zip(fl["layer"], fl["rank"])],
                      run.metrics.set_index("epoch").sort_index())


def _key_without(spec: dict, *keys: str) -> str:
    return json.dumps({k: v for k, v in spec.items() if k not in keys}, sort_keys=True)


def _seeds(runs: Sequence[RunSummary]) -> list[int]:
    return sorted({r.spec["seed"] for r in runs})


def _setting(runs: Sequence[RunSummary]) -> dict:
    """The setting (models, datasets, training sizes, epochs, seeds) of the runs a verdict rests on."""
    return theory_verdicts.setting(RunSpec.from_dict(r.spec) for r in runs)


def _combine(parts: Sequence[str]) -> str:
    if FAILS in parts:
        return FAILS
    if INSUFFICIENT in parts:
        return INSUFFICIENT
    return HOLDS


def _r(x: float, nd: int = 3):
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


# -- statistics across seeds -----------------------------------------------------------

def _t_two_sided(x: float, df: int) -> float:
    """P(|T| <= x) for Student's t with `df` (integer >= 1) degrees of freedom, in closed
    form (Abramowitz and Stegun 26.7.3-4): with c = cos(atan(x / sqrt(df))), a finite
    series in c^2."""
    theta = math.atan(x / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:
        term = total = 1.0
        for k in range(2, df, 2):             # (1.3...(k-1)) / (2.4...k) c^k
            term *= (k - 1) / k * c2
            total += term
        return s * total
    if df == 1:
        return 2.0 * theta / math.pi
    term = total = math.cos(theta)
    for k in range(3, df, 2):                 # (2.4...(k-1)) / (1.3...k) c^k
        term *= (k - 1) / k * c2
        total += term
    return 2.0 / math.pi * (theta + s * total)


def t_quantile(level: float, df: int) -> float:
    """The two-sided Student t critical value: x with P(|T| <= x) = `level` for `df`
    (integer >= 1) degrees of freedom (e.g. 4.303 for level 0.95 at df 2). Bisection on
    the closed-form distribution function, to double precision."""
    if not 0 < level < 1:
        raise ValueError(f"t_quantile: level must lie in (0, 1), got {level!r}")
    if df < 1 or df != int(df):
        raise ValueError(f"t_quantile: df must be an integer >= 1, got {df!r}")
    df = int(df)
    lo, hi = 0.0, 1.0
    while _t_two_sided(hi, df) < level:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _t_two_sided(mid, df) < level:
            lo = mid
        else:
            hi = mid
    return hi


def t_interval(values: Sequence[float], level: float) -> tuple[float, float]:
    """Student t interval of the mean of `values` (n >= 2): mean +- t(level, n-1) s / sqrt(n),
    s the sample standard deviation. Exact coverage when the values are independent and
    normal; no resampling, so it means what it says at n = 3."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        raise ValueError(f"t_interval: needs >= 2 values, got {len(v)}")
    mean = float(v.mean())
    half = t_quantile(level, len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean - half, mean + half


@dataclass
class Effect:
    """One claim's effect aggregated across seeds, with its interval (None: fewer seeds
    than min_seeds)."""
    per_seed: dict[int, float]
    values: list[float]
    mean: float
    ci: tuple[float, float] | None
    level: float
    min_seeds: int

    @property
    def seeds(self) -> list[int]:
        return list(self.per_seed)

    def to_dict(self) -> dict:
        return {"per_seed": {str(s): _r(v, 4) for s, v in self.per_seed.items()},
                "over": "seeds", "n_values": len(self.values), "mean": _r(self.mean, 4),
                "ci": None if self.ci is None else [_r(self.ci[0], 4), _r(self.ci[1], 4)],
                "ci_level": self.level, "method": "Student t", "min_seeds": self.min_seeds}


def across_seeds(values: Sequence[tuple[int, float]], t: dict,
                 bounds: tuple[float, float] | None = None) -> Effect:
    """Aggregate (seed, effect) pairs, one per group (or run) and seed.

    A seed's effect is the mean over its groups; the interval is the Student t interval
    over the seeds' effects, and there is none with fewer than t['min_seeds'] seeds:
    groups trained from one seed share its initialisations and data orders, so only
    seeds sample the seed-to-seed variation. An effect that can only lie within
    `bounds` (a correlation, in [-1, 1]) has its interval cut to them: the part cut off
    holds no possible value, so the interval covers the mean as often as before."""
    by_seed: dict[int, list[float]] = {}
    for seed, v in values:
        by_seed.setdefault(int(seed), []).append(float(v))
    per_seed = {s: float(np.mean(v)) for s, v in sorted(by_seed.items())}
    units = list(per_seed.values())
    mean = float(np.mean(units)) if units else float("nan")
    ci = None
    if len(units) >= t["min_seeds"] and all(np.isfinite(units)):
        ci = t_interval(units, t["ci_level"])
        if bounds is not None:
            ci = (max(ci[0], bounds[0]), min(ci[1], bounds[1]))
    return Effect(per_seed, units, mean, ci, t["ci_level"], int(t["min_seeds"]))


def _shows_effect(eff: Effect, minimum: float) -> str:
    """A claimed positive effect: the interval lies above 0 and the mean reaches `minimum`."""
    if not eff.values or eff.ci is None:
        return INSUFFICIENT
    return HOLDS if eff.ci[0] > 0 and eff.mean >= minimum else FAILS


def _within(eff: Effect, lo: float, hi: float) -> str:
    """A claimed absence (or smallness) of an effect: the whole interval lies in [lo, hi]."""
    if not eff.values or eff.ci is None:
        return INSUFFICIENT
    return HOLDS if lo <= eff.ci[0] and eff.ci[1] <= hi else FAILS


def _interval_rule(t: dict) -> str:
    return (f"Intervals: two-sided {100 * t['ci_level']:g}% Student t interval of the mean over the "
            f"per-seed effects (mean +- t(n-1) s / sqrt(n), n seeds; a seed's effect is the mean "
            f"over its groups or runs). Only seeds are independent replicates: a seed's groups "
            f"share its initialisations and data orders. Fewer than {int(t['min_seeds'])} seeds "
            f"give no interval and the verdict 'insufficient', naming the seeds there are. A "
            f"correlation's interval is cut to [-1, 1], a fraction's to [0, 1]: the values each can take.")


# -- the claims ------------------------------------------------------------------------

def _trend(runs: Sequence[RunSummary], key: str, sign: int, min_points: int, t: dict,
           extra_filter: Callable[[RunSummary], bool] = lambda r: True) -> dict:
    """Spearman(key, final rank) within groups equal but for `key` (one seed each);
    `sign` is the claimed direction (+1: rank grows with key). A flat group's effect is 0."""
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        if extra_filter(r):
            groups.setdefault(_key_without(r.spec, key), []).append(r)
    flat, contradicting = [], []
    details, used, effects = [], [], []
    for members in groups.values():
        members = sorted(members, key=lambda r: r.spec[key])
        if len({r.spec[key] for r in members}) < min_points:
            continue
        xs = [r.spec[key] for r in members]
        ys = [r.final_rank for r in members]
        rng = (max(ys) - min(ys)) / max(ys) if max(ys) > 0 else 0.0
        rho = spearman(xs, ys)
        first = members[0].spec
        d = {"fixed": {k: first[k] for k in ("model", "dataset", "loss", "lr", "batch_size",
                                              "weight_decay", "seed") if k in first and k != key},
             key: xs, "final_rank": [round(y, 2) for y in ys], "spearman": _r(rho),
             "relative_range": _r(rng), "flat": bool(rng < t["flat"] or not np.isfinite(rho))}
        d["fixed"]["model"] = _model(first)
        details.append(d)
        used += members
        if d["flat"]:
            flat.append(d)
            effects.append((first["seed"], 0.0))
            continue
        effects.append((first["seed"], sign * rho))
        if sign * rho <= -t["min_spearman"]:
            contradicting.append(d)
    eff = across_seeds(effects, t, bounds=(-1.0, 1.0))
    verdict = INSUFFICIENT if not details else _shows_effect(eff, t["min_spearman"])
    return {"verdict": verdict, "groups": details, "n_groups": len(details), "n_flat": len(flat),
            "spearman_in_claimed_direction": eff.to_dict(), "_effect": eff,
            "n_contradicting": len(contradicting), "n_runs": len(used),
            "run_ids": [r.run_id for r in used], "seeds": _seeds(used), "setting": _setting(used)}


def _trend_rule(label: str, sign: int, min_points: int, t: dict) -> str:
    flipped = ", sign flipped" if sign < 0 else ""
    return (f"Groups of runs equal in every setting but {label} (one seed each) with >= {min_points} "
            f"values. Per group, Spearman correlation of final rank with {label}{flipped}; a flat "
            f"group counts as 0. Holds when the interval of the mean lies above 0 and the mean is "
            f">= {t['min_spearman']}.")


def _model(spec: dict) -> str:
    return RunSpec.from_dict(spec).model


def _hyper_trend(runs, t, key: str, label: str, sign: int, min_points: int) -> dict:
    """C1/C2: final rank moves with one hyperparameter among runs with weight decay > 0."""
    res = _trend(runs, key, sign, min_points, t, lambda r: r.spec["weight_decay"] > 0)
    res.pop("run_ids")
    res["rule"] = "Weight decay > 0. " + _trend_rule(label, sign, min_points, t)
    res["intervals"] = {"Spearman": res.pop("_effect")}
    return res


def claim_c1(runs: list[RunSummary], t: dict) -> dict:
    return _hyper_trend(runs, t, "batch_size", "batch size", +1, 3)


def claim_c2(runs: list[RunSummary], t: dict) -> dict:
    return _hyper_trend(runs, t, "lr", "learning rate", -1, 2)


def _rank_reduction(runs: Sequence[RunSummary], t: dict) -> Effect:
    """Per run, 1 - final/initial rank: 0 when the rank did not fall."""
    return across_seeds([(r.spec["seed"], 1.0 - r.relative_rank) for r in runs], t)


def claim_c3(runs: list[RunSummary], t: dict) -> dict:
    trend = _trend(runs, "weight_decay", -1, 3, t)
    zero = [r for r in runs if r.spec["weight_decay"] == 0]
    ratios = [r.relative_rank for r in zero]
    reduction = _rank_reduction(zero, t)
    zero_verdict = _within(reduction, -math.inf, 1.0 - t["c3_lambda0_ratio"])
    res = dict(trend)
    res["verdict"] = _combine([trend["verdict"], zero_verdict])
    res["trend_verdict"] = trend["verdict"]
    res["lambda0"] = {"verdict": zero_verdict, "n_runs": len(zero),
                      "final_over_initial_rank": [_r(x) for x in ratios],
                      "min_final_over_initial": _r(min(ratios)) if ratios else None,
                      "rank_reduction": reduction.to_dict()}
    res["intervals"] = {"Spearman": res.pop("_effect"), "lambda=0 rank reduction": reduction}
    ids = set(trend.pop("run_ids")) | {r.run_id for r in zero}
    res["n_runs"] = len(ids)
    res["seeds"] = sorted(set(trend["seeds"]) | set(_seeds(zero)))
    res["setting"] = _setting([r for r in runs if r.run_id in ids])
    res["rule"] = (f"(a) {_trend_rule('weight decay', -1, 3, t)} (b) Runs with weight decay 0: "
                   f"rank reduction 1 - final/initial rank; holds when its interval lies below "
                   f"{1.0 - t['c3_lambda0_ratio']:g}. Holds when both hold.")
    return res


def _window_mean(s: pd.Series, lo: float, hi: float) -> float:
    s = s.dropna()
    s = s[s.index >= 1]
    if s.empty:
        return float("nan")
    e = int(s.index.max())
    w = s[(s.index > lo * e) & (s.index <= hi * e)]
    return float(w.mean()) if len(w) else float("nan")


# A lambda = 0 run that stopped moving (d = 0) gives an infinite ratio; for the mean it
# counts as this many orders of magnitude.
C4_MAX_LOG10 = 12.0


def claim_c4(runs: list[RunSummary], t: dict) -> dict:
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        if r.spec["epochs"] >= 4 and "distance" in r.metrics:
            groups.setdefault(_key_without(r.spec, "weight_decay"), []).append(r)
    # Verdicts use the raw ratios; `pairs` reports them rounded.
    pairs, ratios, persist, used, effects = [], [], [], [], []
    n_unusable = 0
    for members in groups.values():
        zero = [r for r in members if r.spec["weight_decay"] == 0]
        pos = [r for r in members if r.spec["weight_decay"] > 0]
        if not zero or not pos:
            continue
        d0 = _window_mean(zero[0].metrics["distance"], 0.75, 1.0)
        if not np.isfinite(d0):
            n_unusable += len(pos)  # no late distance for lambda = 0: nothing to compare with
            continue
        used += members
        for r in pos:
            late = _window_mean(r.metrics["distance"], 0.75, 1.0)
            early = _window_mean(r.metrics["distance"], 0.25, 0.5)
            ratio = late / d0 if d0 > 0 else float("inf")
            q = late / early if early > 0 else float("nan")
            log_ratio = (math.log10(ratio) if ratio > 0 and np.isfinite(ratio)
                         else C4_MAX_LOG10 if ratio == float("inf") else float("nan"))
            pairs.append({"model": _model(r.spec), "dataset": r.spec["dataset"], "loss": r.spec["loss"],
                          "batch_size": r.spec["batch_size"], "lr": r.spec["lr"], "seed": r.spec["seed"],
                          "weight_decay": r.spec["weight_decay"], "d_late": _r(late, 5),
                          "d_late_lambda0": _r(d0, 5), "ratio": _r(ratio),
                          "log10_ratio": _r(log_ratio), "persistence": _r(q)})
            ratios.append(ratio)
            persist.append(q)
            effects.append((r.spec["seed"], min(log_ratio, C4_MAX_LOG10)))
    known = [x for x in ratios if not np.isnan(x)]
    med = float(np.median(known)) if known else float("nan")
    if any(np.isnan(v) for _, v in effects):
        eff = across_seeds([], t)
        verdict = FAILS if pairs else INSUFFICIENT  # a ratio of 0/0 or with a NaN late d
    else:
        eff = across_seeds(effects, t)
        verdict = _shows_effect(eff, math.log10(t["c4_min_ratio"])) if pairs else INSUFFICIENT
        if verdict == HOLDS and not all(np.isfinite(q) and q >= t["c4_min_persist"] for q in persist):
            verdict = FAILS
    return {"verdict": verdict, "pairs": pairs, "median_ratio": _r(med),
            "log10_ratio": eff.to_dict(), "intervals": {"log10 d ratio": eff},
            "n_unusable_pairs": n_unusable, "n_runs": len(used), "seeds": _seeds(used),
            "setting": _setting(used),
            "rule": (f"d = mean relative change of every weight matrix between consecutive epochs, "
                     f"averaged over the last quarter of epochs ('late') and the second quarter "
                     f"('early'). Each run with weight decay > 0 is paired with the run equal but "
                     f"for weight decay 0; the effect is log10 of the late-d ratio (lambda > 0 over "
                     f"lambda = 0; a lambda = 0 run with late d = 0 counts as {C4_MAX_LOG10:g}). Holds "
                     f"when its interval lies above 0, its mean is >= log10({t['c4_min_ratio']:g}), "
                     f"and every lambda > 0 run keeps late d >= {t['c4_min_persist']} x early d "
                     f"(bounded below). A pair whose lambda = 0 run has no late d is left out "
                     f"(insufficient when none is left). The paper's 'orders of magnitude' refers "
                     f"to 500-epoch runs; the mean log10 ratio reports how many are measured here.")}


def claim_c5(runs: list[RunSummary], t: dict) -> dict:
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        key = json.dumps({k: r.spec[k] for k in ("dataset", "arch", "depth", "width", "loss", "epochs",
                                                 "train_subset", "test_subset", "seed")}, sort_keys=True)
        groups.setdefault(key, []).append(r)
    details, used, drops, gap_diffs = [], [], [], []
    for members in groups.values():
        low = [r for r in members if r.relative_rank < t["c5_low_rank"]]
        high = [r for r in members if r.relative_rank >= t["c5_high_rank"]]
        if not low or not high:
            continue
        used += members
        tr_low = float(np.mean([r.final("train_acc") for r in low]))
        tr_high = float(np.mean([r.final("train_acc") for r in high]))
        te_low = float(np.mean([r.final("test_acc") for r in low]))
        te_high = float(np.mean([r.final("test_acc") for r in high]))
        gap_low, gap_high = tr_low - te_low, tr_high - te_high
        seed = members[0].spec["seed"]
        drops.append((seed, tr_high - tr_low))
        gap_diffs.append((seed, gap_low - gap_high))
        details.append({"model": _model(members[0].spec), "dataset": members[0].spec["dataset"],
                        "seed": seed, "n_low_rank": len(low), "n_high_rank": len(high),
                        "train_acc_low": _r(tr_low), "train_acc_high": _r(tr_high),
                        "test_acc_low": _r(te_low), "test_acc_high": _r(te_high),
                        "gap_low": _r(gap_low), "gap_high": _r(gap_high),
                        "gap_difference": _r(gap_low - gap_high),
                        "train_acc_drop": _r(tr_high - tr_low), "test_acc_gain": _r(te_low - te_high)})
    drop, gap = across_seeds(drops, t), across_seeds(gap_diffs, t)
    hurts = _shows_effect(drop, t["c5_acc_drop"])
    marginal = _within(gap, -t["c5_gap_margin"], t["c5_gap_margin"])
    verdict = INSUFFICIENT if not details else _combine([hurts, marginal])
    return {"verdict": verdict, "groups": details, "n_runs": len(used), "seeds": _seeds(used),
            "setting": _setting(used),
            "train_acc_drop": drop.to_dict(), "gap_difference": gap.to_dict(),
            "hurts_training": hurts, "marginal_generalisation": marginal,
            "intervals": {"train acc drop": drop, "gap difference": gap},
            "rule": (f"Within runs of one model, dataset, loss, length and seed: runs whose final "
                     f"rank is < {t['c5_low_rank']} x their initial rank ('very low') against runs "
                     f"at >= {t['c5_high_rank']} x ('high'). (a) Hurts training: the train accuracy "
                     f"drop (high minus very low) has an interval above 0 and a mean >= "
                     f"{t['c5_acc_drop']}. (b) Marginal effect on generalisation: the difference of "
                     f"the generalisation gaps (train minus test accuracy; very low minus high) "
                     f"has its interval within +-{t['c5_gap_margin']}. Holds when both hold.")}


def claim_c6(runs: list[RunSummary], t: dict) -> dict:
    mlp, res = [], []
    for r in runs:
        if r.relative_rank >= t["c6_min_reduction"] or r.spec["weight_decay"] == 0:
            continue
        ranks = [x for _, x in r.final_layers]
        names = [n for n, _ in r.final_layers]
        if r.spec["arch"] in ("mlp", "mlp_bn") and len(ranks) >= 3:
            ends = min(ranks[0], ranks[-1])
            middle = min(ranks[1:-1])
            mlp.append({"run_id": r.run_id, "model": _model(r.spec), "batch_size": r.spec["batch_size"],
                        "lr": r.spec["lr"], "seed": r.spec["seed"],
                        "layer_ranks": [round(x, 1) for x in ranks],
                        "middle_min": middle, "ends_min": ends,
                        "bottleneck": bool(middle <= t["c6_bottleneck"] * ends)})
        elif r.spec["arch"] in ("res", "res_bn"):
            blocks: dict[str, list[float]] = {}
            for n, x in zip(names, ranks):
                if n.startswith("block"):
                    blocks.setdefault(n.split(".")[0], []).append(x)
            if len(blocks) < 2:
                continue
            per_block = [float(np.mean(v)) for v in blocks.values()]
            bal = min(per_block) / max(per_block) if max(per_block) > 0 else float("nan")
            res.append({"run_id": r.run_id, "model": _model(r.spec), "batch_size": r.spec["batch_size"],
                        "lr": r.spec["lr"], "seed": r.spec["seed"],
                        "block_ranks": [round(x, 1) for x in per_block],
                        "balance": _r(bal), "balanced": bool(np.isfinite(bal) and bal >= t["c6_balance"])})

    def part(items, flag):
        eff = across_seeds([(i["seed"], float(i[flag])) for i in items], t, bounds=(0.0, 1.0))
        verdict = INSUFFICIENT if not items else _shows_effect(eff, t["c6_min_fraction"])
        return verdict, (round(eff.mean, 3) if items else None), eff

    v_mlp, f_mlp, e_mlp = part(mlp, "bottleneck")
    v_res, f_res, e_res = part(res, "balanced")
    ids = {i["run_id"] for i in mlp + res}
    return {"verdict": _combine([v_mlp, v_res]),
            "mlp": {"verdict": v_mlp, "fraction_bottleneck": f_mlp, "fraction": e_mlp.to_dict(),
                    "runs": mlp},
            "resnet": {"verdict": v_res, "fraction_balanced": f_res, "fraction": e_res.to_dict(),
                       "runs": res},
            "intervals": {"MLP bottleneck fraction": e_mlp, "ResNet balanced fraction": e_res},
            "n_runs": len(ids), "seeds": _seeds([r for r in runs if r.run_id in ids]),
            "setting": _setting([r for r in runs if r.run_id in ids]),
            "rule": (f"Runs with weight decay > 0 whose rank fell below {t['c6_min_reduction']} x "
                     f"its initial value, at their last logged epoch. MLPs (>= 3 hidden matrices): "
                     f"bottleneck when the lowest middle-layer rank is <= {t['c6_bottleneck']} x the "
                     f"lower of the first and last hidden layers. ResNets (>= 2 blocks): balanced "
                     f"when min/max of the per-block mean ranks is >= {t['c6_balance']}. Each part "
                     f"holds when the fraction of runs showing the pattern has a mean >= "
                     f"{t['c6_min_fraction']} and an interval above 0; the claim holds when both "
                     f"parts hold.")}


def claim_c7(runs: list[RunSummary], t: dict) -> dict:
    full = [r for r in runs if r.spec["batch_size"] >= r.train_size() > 0]
    judged = [r for r in full if r.train_size() >= t["c7_tiny_data"]]
    ratios = [r.relative_rank for r in judged]
    reduction = _rank_reduction(judged, t)
    verdict = _within(reduction, -math.inf, 1.0 - t["c7_ratio"])
    return {"verdict": verdict, "n_runs": len(judged), "seeds": _seeds(judged), "setting": _setting(judged),
            "n_tiny_data_runs": len(full) - len(judged),
            "runs": [{"run_id": r.run_id, "model": _model(r.spec), "train_size": r.train_size(),
                      "epochs": r.spec["epochs"], "weight_decay": r.spec["weight_decay"],
                      "seed": r.spec["seed"],
                      "final_over_initial_rank": _r(r.relative_rank)} for r in judged],
            "min_final_over_initial": _r(min(ratios)) if ratios else None,
            "rank_reduction": reduction.to_dict(), "intervals": {"rank reduction": reduction},
            "rule": (f"Runs whose batch is the whole training set (at least {int(t['c7_tiny_data'])} "
                     f"examples; smaller sets are exempt as 'tiny data'). Rank reduction 1 - "
                     f"final/initial rank per run; holds when its interval lies below "
                     f"{1.0 - t['c7_ratio']:g}.")}


def claim_r1(runs: list[RunSummary], t: dict) -> dict:
    """Rank floor (Zangrando et al.): the strongest-bias runs keep every hidden rank >= k - 1."""
    floor = NUM_CLASSES - 1
    by_seed: dict[int, list[RunSummary]] = {}
    for r in runs:
        if r.spec["weight_decay"] > 0 and r.final_layers and np.isfinite(r.relative_rank):
            by_seed.setdefault(int(r.spec["seed"]), []).append(r)
    judged: list[RunSummary] = []
    for members in by_seed.values():
        members = sorted(members, key=lambda r: (r.relative_rank, r.run_id))
        judged += members[:max(1, math.ceil(t["r1_strongest"] * len(members)))]
    lowest = [min(x for _, x in r.final_layers) for r in judged]
    # how far a run's lowest hidden rank falls short of the floor (0 when it keeps it)
    shortfalls = [(r.spec["seed"], min(x - floor, 0.0)) for r, x in zip(judged, lowest)]
    eff = across_seeds(shortfalls, t)
    verdict = _within(eff, 0.0, math.inf) if judged else INSUFFICIENT
    return {"verdict": verdict, "floor": floor, "n_runs": len(judged), "seeds": _seeds(judged),
            "setting": _setting(judged),
            "n_below_floor": sum(x < floor for x in lowest),
            "runs": [{"run_id": r.run_id, "model": _model(r.spec), "batch_size": r.spec["batch_size"],
                      "lr": r.spec["lr"], "weight_decay": r.spec["weight_decay"], "seed": r.spec["seed"],
                      "final_over_initial_rank": _r(r.relative_rank), "mean_hidden_rank": _r(r.final_rank, 2),
                      "lowest_layer": min(r.final_layers, key=lambda lx: lx[1])[0],
                      "lowest_layer_rank": _r(x, 2)} for r, x in zip(judged, lowest)],
            "shortfall": eff.to_dict(), "intervals": {"shortfall below k-1": eff},
            "effect": (f"lowest hidden rank {_r(min(lowest), 2) if lowest else None} against the floor "
                       f"{floor} (k = {NUM_CLASSES} classes) over {len(judged)} strongest-bias runs; "
                       f"{sum(x < floor for x in lowest)} below it"),
            "rule": (f"Runs with weight decay > 0: per seed, the {t['r1_strongest']:g} fraction (at "
                     f"least one) with the lowest final/initial rank ('strongest bias'). Per run, "
                     f"the shortfall is min(0, lowest final rank over its hidden matrices - "
                     f"{floor}), {floor} being the number of classes {NUM_CLASSES} minus one. Holds "
                     f"when the interval of the mean shortfall lies at 0 (no run below the floor).")}


def _late_distances(r: RunSummary) -> tuple[float, float]:
    """Mean d(W_t, W_t+1) over the last tenth of the epochs, and over the tenth before."""
    if "distance" not in r.metrics:
        return float("nan"), float("nan")
    return _window_mean(r.metrics["distance"], 0.9, 1.0), _window_mean(r.metrics["distance"], 0.8, 0.9)


def claim_r2(runs: list[RunSummary], t: dict) -> dict:
    """Full-batch GD with weight decay at stationarity (Kuzborskij & Abbasi-Yadkori)."""
    full = [r for r in runs if r.spec["batch_size"] >= r.train_size() > 0 and r.spec["weight_decay"] > 0]
    judged, rows = [], []
    for r in full:
        late, before = _late_distances(r)
        # One step an epoch: with no gradient, coupled weight decay alone shrinks W by
        # lr * lambda / (1 - momentum) per step once the momentum has built up, and d is that.
        shrink = r.spec["lr"] * r.spec["weight_decay"] / max(1.0 - r.spec["momentum"], 1e-12)
        at_rest = bool(late <= t["r2_max_distance"])
        flattened = bool(before > 0 and late >= t["r2_flat"] * before and late <= t["r2_max_shrink"] * shrink)
        stationary = bool(np.isfinite(late) and (at_rest or flattened))
        rows.append({"run_id": r.run_id, "model": _model(r.spec), "train_size": r.train_size(),
                     "epochs": r.spec["epochs"], "lr": r.spec["lr"], "weight_decay": r.spec["weight_decay"],
                     "seed": r.spec["seed"], "d_late": _r(late, 8), "d_before": _r(before, 8),
                     "decay_shrink": _r(shrink, 8), "stationary": stationary,
                     "final_over_initial_rank": _r(r.relative_rank)})
        if stationary:
            judged.append(r)
    reduction = _rank_reduction(judged, t)
    verdict = _shows_effect(reduction, t["r2_min_reduction"]) if judged else INSUFFICIENT
    ratios = [r.relative_rank for r in judged]
    return {"verdict": verdict, "n_runs": len(judged), "seeds": _seeds(judged), "setting": _setting(judged),
            "n_not_stationary": len(full) - len(judged), "runs": rows,
            "max_final_over_initial": _r(max(ratios)) if ratios else None,
            "rank_reduction": reduction.to_dict(), "intervals": {"rank reduction": reduction},
            "effect": (f"max final/initial rank {_r(max(ratios)) if ratios else None} over "
                       f"{len(judged)} full-batch runs at stationarity ({len(full) - len(judged)} "
                       f"not stationary, left out)"),
            "rule": (f"Runs with weight decay > 0 whose batch is the whole training set (any size). "
                     f"A run is at stationarity when d(W_t, W_t+1), averaged over the last tenth of "
                     f"its epochs ('late'), is <= {t['r2_max_distance']:g} (at rest), or has flattened: "
                     f"late d >= {t['r2_flat']:g} x the mean over the tenth before, and <= "
                     f"{t['r2_max_shrink']:g} x lr x weight decay / (1 - momentum), the shrink per "
                     f"step that weight decay alone gives (a run whose d is that shrink is decaying "
                     f"towards the zero function, not held by its gradient). Other runs are counted "
                     f"and left out. Rank reduction 1 - final/initial rank per run; holds (the rank "
                     f"falls, contrary to C7's reading) when its interval lies above 0 and its mean "
                     f"is >= {t['r2_min_reduction']:g}.")}


def _label_noise(r: RunSummary) -> float:
    return float(r.spec.get("label_noise", 0.0))


def claim_r3(runs: list[RunSummary], t: dict) -> dict:
    """Label noise lowers the rank at weight decay 0 (Varre, Sagitova & Flammarion)."""
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        if r.spec["weight_decay"] == 0:
            groups.setdefault(_key_without(r.spec, "label_noise"), []).append(r)
    pairs, used, effects = [], [], []
    for members in groups.values():
        clean = [r for r in members if _label_noise(r) == 0]
        noisy = sorted((r for r in members if _label_noise(r) > 0), key=_label_noise)
        if not clean or not noisy or not clean[0].final_rank > 0:
            continue
        twin = clean[0]
        used += [twin, *noisy]
        for r in noisy:
            # twins share seed, so initialisation: the same initial rank
            reduction = 1.0 - r.final_rank / twin.final_rank
            effects.append((r.spec["seed"], reduction))
            pairs.append({"model": _model(r.spec), "dataset": r.spec["dataset"], "loss": r.spec["loss"],
                          "batch_size": r.spec["batch_size"], "lr": r.spec["lr"], "seed": r.spec["seed"],
                          "label_noise": _label_noise(r), "final_rank": _r(r.final_rank, 2),
                          "final_rank_clean": _r(twin.final_rank, 2),
                          "final_over_initial_rank": _r(r.relative_rank),
                          "final_over_initial_rank_clean": _r(twin.relative_rank),
                          "rank_reduction_vs_clean": _r(reduction, 4),
                          "train_acc": _r(r.final("train_acc")), "train_acc_clean": _r(twin.final("train_acc")),
                          "test_acc": _r(r.final("test_acc")), "test_acc_clean": _r(twin.final("test_acc"))})
    eff = across_seeds(effects, t)
    verdict = _shows_effect(eff, t["r3_min_reduction"]) if pairs else INSUFFICIENT
    noise = sorted({p["label_noise"] for p in pairs})
    return {"verdict": verdict, "n_runs": len(used), "seeds": _seeds(used), "setting": _setting(used),
            "pairs": pairs, "label_noise": noise,
            "rank_reduction_vs_clean": eff.to_dict(), "intervals": {"rank reduction vs p=0": eff},
            "effect": (f"final rank with label noise p = {', '.join(f'{p:g}' for p in noise) or '-'} "
                       f"against the same run at p = 0 (weight decay 0): "
                       + ("; ".join(f"seed {p['seed']} p={p['label_noise']:g}: {p['final_rank']} vs "
                                    f"{p['final_rank_clean']}" for p in pairs[:6])
                          + (f"; ... ({len(pairs)} pairs)" if len(pairs) > 6 else "")
                          if pairs else "no pair of runs at weight decay 0 with and without label noise")),
            "rule": (f"Runs with weight decay 0. Each run with label noise p > 0 (at every step, each "
                     f"sample's label replaced with probability p by a class drawn uniformly from all "
                     f"classes; accuracies measured on the true labels) is paired with the run equal "
                     f"but for p = 0 (same seed, so the same initialisation and data order). The "
                     f"effect is 1 - final rank (p > 0) / final rank (p = 0); holds when its interval "
                     f"lies above 0 and its mean is >= {t['r3_min_reduction']:g}. The cited work "
                     f"proves it for two-layer linear networks with square loss and Gaussian label "
                     f"noise; this checks its discrete analogue on classification. Runs with label "
                     f"noise are judged here only: every other claim judges runs on the true labels.")}


CLAIMS: dict[str, Callable[[list[RunSummary], dict], dict]] = {
    "C1": claim_c1, "C2": claim_c2, "C3": claim_c3, "C4": claim_c4, "C5": claim_c5, "C6": claim_c6,
    "C7": claim_c7, "R1": claim_r1, "R2": claim_r2, "R3": claim_r3}


def claim_runs(cid: str, runs: Sequence[RunSummary]) -> list[RunSummary]:
    """The runs claim `cid` judges: all for LABEL_NOISE_CLAIMS, else those trained on the
    true labels (label_noise 0): the paper's claims are about plain SGD."""
    if cid in LABEL_NOISE_CLAIMS:
        return list(runs)
    return [r for r in runs if _label_noise(r) == 0]

# The rank conventions the robustness table judges under ((measure, normalise); the
# threshold ones at the config's tol), and the claims it judges.
CONVENTIONS: tuple[tuple[str, str, str], ...] = (
    ("threshold on W/‖W‖_F (the paper's)", "threshold", "fro"),
    ("threshold on W/σ_max", "threshold", "max"),
    ("effective rank exp H(σ/Σσ)", "effective", "fro"),
    ("stable rank ‖W‖_F²/‖W‖₂²", "stable", "fro"),
)
CONVENTION_CLAIMS = ("C1", "C2", "C3", "R1", "R3")


def _summaries(runs: Sequence[Run], normalise: str, tol: float, conv: str,
               measure: str) -> tuple[list[RunSummary], list[str]]:
    """Summaries of the runs that did not diverge, and the ids of those these rank
    settings measure nothing on (no singular value above tol at epoch 0: relative ranks
    0/0), left out."""
    summaries, unmeasured = [], []
    for run in runs:
        if run.diverged:
            continue
        s = summarise(run, normalise, tol, conv, measure)
        if not s.initial_rank > 0:
            unmeasured.append(run.run_id)
            continue
        summaries.append(s)
    return summaries, unmeasured


def robustness(runs: Sequence[Run], t: dict, tol: float, conv: str = M.DEFAULT_CONV) -> dict:
    """C1-C3, R1 and R3 judged under every rank convention in CONVENTIONS, from the stored
    spectra (nothing retrains), and whether each claim's verdicts agree."""
    conventions: list[dict] = []
    verdicts: dict[str, dict[str, dict]] = {cid: {} for cid in CONVENTION_CLAIMS}
    for name, measure, normalise in CONVENTIONS:
        summaries, unmeasured = _summaries(runs, normalise, tol, conv, measure)
        conventions.append({"name": name, "measure": measure,
                            "normalise": normalise if measure == "threshold" else None,
                            "tol": tol if measure == "threshold" else None,
                            "judged": len(summaries), "unmeasured": len(unmeasured)})
        for cid in CONVENTION_CLAIMS:
            res = CLAIMS[cid](claim_runs(cid, summaries), t)
            verdicts[cid][name] = {"verdict": res["verdict"],
                                   "intervals": {k: e.to_dict() for k, e in res["intervals"].items()}}
    claims = [{"id": cid, "verdicts": v, "agree": len({x["verdict"] for x in v.values()}) == 1}
              for cid, v in verdicts.items()]
    return {"conventions": conventions, "claims": claims}


def thresholds(overrides: dict | None) -> dict:
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEFAULT_THRESHOLDS))
    if unknown:
        raise ValueError(f"claims: unknown threshold(s) {', '.join(map(repr, unknown))}; allowed: "
                         f"{', '.join(DEFAULT_THRESHOLDS)}")
    for k, v in overrides.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"claims.{k}: expected a number, got {v!r}")
    t = {**DEFAULT_THRESHOLDS, **overrides}
    if not 0 < t["ci_level"] < 1:
        raise ValueError(f"claims.ci_level: expected a number in (0, 1), got {t['ci_level']!r}")
    if t["min_seeds"] < 2 or t["min_seeds"] != int(t["min_seeds"]):
        raise ValueError(f"claims.min_seeds: expected an integer >= 2 (a t interval needs two "
                         f"seeds), got {t['min_seeds']!r}")
    return t


def judge(runs: Sequence[Run], normalise: str = M.DEFAULT_NORMALISE, tol: float = M.DEFAULT_TOL,
          overrides: dict | None = None, missing: Sequence[str] = (), conv: str = M.DEFAULT_CONV,
          measure: str = M.DEFAULT_MEASURE) -> dict:
    t = thresholds(overrides)
    diverged = [{"run_id": run.run_id, **(run.info.get("diverged") or {})} for run in runs if run.diverged]
    # A run with no singular value above tol at epoch 0 is left out and counted; with
    # every run so, every claim is insufficient.
    summaries, unmeasured = _summaries(runs, normalise, tol, conv, measure)
    claims, beyond = [], []
    for cid, fn in CLAIMS.items():
        res = fn(claim_runs(cid, summaries), t)
        res["intervals"] = {k: e.to_dict() for k, e in res["intervals"].items()}
        row = {"id": cid, "statement": STATEMENTS[cid], **res}
        if cid in BEYOND_PAPER:
            beyond.append({**row, "beyond_paper": True, "source": BEYOND_PAPER[cid]})
        else:
            claims.append(row)
    # the paper's claims, its theory, then the checks beyond it
    claims += theory_verdicts.verdicts([r for r in runs if not r.diverged]) + beyond
    return {"claims": claims, "rank": {"measure": measure, "normalise": normalise, "tol": tol, "conv": conv},
            "thresholds": t, "robustness": robustness(runs, t, tol, conv),
            "runs": {"available": len(runs), "judged": len(summaries), "diverged": len(diverged),
                     "unmeasured": len(unmeasured), "missing": len(missing)},
            "diverged_runs": diverged, "unmeasured_runs": unmeasured, "missing_runs": list(missing)}


# -- report ----------------------------------------------------------------------------

def _effect(c: dict) -> str:
    if "effect" in c:
        return c["effect"]
    cid = c["id"]
    if cid in ("C1", "C2"):
        return f"Spearman in the claimed direction; {c['n_flat']} of {c['n_groups']} groups flat"
    if cid == "C3":
        return (f"Spearman in the claimed direction ({c['n_flat']} of {c['n_groups']} groups flat); "
                f"lambda=0: final/initial rank >= {c['lambda0']['min_final_over_initial']} "
                f"({c['lambda0']['n_runs']} runs)")
    if cid == "C4":
        return f"median d ratio (lambda>0 / lambda=0) {c['median_ratio']} over {len(c['pairs'])} pairs"
    if cid == "C5":
        return "; ".join(f"{g['model']} seed {g['seed']}: very low vs high rank, train acc "
                         f"{-g['train_acc_drop']:+.3f}, gap {g['gap_low']:.3f} vs {g['gap_high']:.3f}"
                         for g in c["groups"]) or "no group with both very low and high rank"
    if cid == "C6":
        return (f"MLP bottleneck in {c['mlp']['fraction_bottleneck']} of {len(c['mlp']['runs'])} runs; "
                f"ResNet balanced in {c['resnet']['fraction_balanced']} of {len(c['resnet']['runs'])}")
    if cid == "C7":
        return f"min final/initial rank {c['min_final_over_initial']} over {c['n_runs']} full-batch runs"
    return ""


def interval_text(e: dict) -> str:
    """'mean [lo, hi] (n seeds)', or says why there is no interval, naming the seeds."""
    n = e["n_values"]
    if n == 0:
        return "no values"
    mean = "n/a" if e["mean"] is None else f"{e['mean']:.3g}"
    if e["ci"] is None:
        seeds = ", ".join(e["per_seed"])
        if n < e["min_seeds"]:
            return (f"{mean} from {n} seed{'s' if n > 1 else ''} ({seeds}): fewer than "
                    f"{e['min_seeds']} seeds, no interval")
        return f"{mean} from {n} seeds ({seeds}): a non-finite effect, no interval"
    return f"{mean} [{e['ci'][0]:.3g}, {e['ci'][1]:.3g}] ({n} seeds)"


def _intervals(c: dict) -> str:
    return "; ".join(f"{name}: {interval_text(e)}" for name, e in c.get("intervals", {}).items()) or "-"


def markdown(result: dict) -> str:
    r = result["runs"]
    lines = ["# Claims", "",
             f"Judged on {r['judged']} run(s) ({r['diverged']} diverged and excluded, "
             f"{r.get('unmeasured', 0)} with no singular value above tol {result['rank']['tol']:g} at "
             f"epoch 0 and excluded, {r['missing']} not available). Rank: {_rank_text(result['rank'])}.",
             "", "Rows R1-R3 are checks beyond the paper, from the later work each one cites.", "",
             f"| id | claim | verdict | effect: mean [{100 * result['thresholds']['ci_level']:g}% Student t "
             "interval] (seeds) | effect measured | runs | seeds |",
             "|---|---|---|---|---|---|---|"]
    for c in result["claims"]:
        statement = c["statement"]
        if c.get("beyond_paper"):
            statement += f" *Check beyond the paper: {c['source']}.*"
        lines.append(f"| {c['id']} | {statement} | **{c['verdict']}** | {_intervals(c)} | "
                     f"{_effect(c)} | {c['n_runs']} | {len(c['seeds'])}: "
                     f"{', '.join(map(str, c['seeds'])) or '-'} |")
    lines += ["", "## How each verdict is reached", "",
              "`insufficient` means the runs needed to judge the claim are not there. "
              "A group is *flat* when its final ranks differ by less than "
              f"{result['thresholds']['flat']:g} (relative range).",
              "", _interval_rule(result["thresholds"]), ""]
    for c in result["claims"]:
        lines += [f"### {c['id']}: {c['verdict']}", "",
                  f"Setting: {theory_verdicts.setting_text(c.get('setting'))}.", "", c["rule"], ""]
        if c.get("n_violations"):
            lines += [f"{c['n_violations']} violation(s), the first {len(c['violations'])}:", ""]
            lines += [f"- {json.dumps(v, sort_keys=True)}" for v in c["violations"]] + [""]
    if result.get("robustness"):
        lines += robustness_markdown(result["robustness"])
    if result["diverged_runs"]:
        lines += ["## Diverged runs (excluded)", ""]
        for d in result["diverged_runs"]:
            lines.append(f"- {d['run_id']}: epoch {d.get('epoch')}, {d.get('reason', '')}")
        lines.append("")
    lines += ["## Thresholds", "", "| name | value |", "|---|---|"]
    lines += [f"| {k} | {v:g} |" for k, v in result["thresholds"].items()]
    lines += ["", "Full per-group numbers: claims.json.", ""]
    return "\n".join(lines)


def _rank_text(rank: dict) -> str:
    measure = rank.get("measure", M.DEFAULT_MEASURE)
    if measure != "threshold":
        return f"measure={measure}"
    return f"measure=threshold, normalise={rank['normalise']}, tol={rank['tol']:g}"


def robustness_markdown(rob: dict) -> list[str]:
    """The robustness table: C1-C3, R1 and R3 under each rank convention, and whether they agree."""
    names = [c["name"] for c in rob["conventions"]]
    lines = ["## Robustness to the rank convention", "",
             "The same stored spectra, ranked four ways (thresholds at the config's tol); every "
             "claim judged with the rules above. A verdict that changes with the convention rests "
             "on it.", "",
             "| claim | " + " | ".join(names) + " | agree |",
             "|---|" + "---|" * len(names) + "---|"]
    for c in rob["claims"]:
        cells = []
        for name in names:
            v = c["verdicts"][name]
            ivs = "; ".join(interval_text(e) for e in v["intervals"].values())
            cells.append(f"**{v['verdict']}** ({ivs})")
        lines.append(f"| {c['id']} | " + " | ".join(cells) + f" | {'yes' if c['agree'] else '**no**'} |")
    lines += ["", "Runs judged per convention: " + "; ".join(
        f"{c['name']}: {c['judged']}" + (f" ({c['unmeasured']} unmeasured)" if c["unmeasured"] else "")
        for c in rob["conventions"]) + ".", ""]
    return lines


def measured(result: dict, figure: str) -> str:
    """One line per claim that `figure` shows: the verdict and effect this run measured."""
    by_id = {c["id"]: c for c in result["claims"]}
    return "; ".join(f"{cid} {by_id[cid]['verdict']}: {_effect(by_id[cid])}"
                     for cid in FIGURE_CLAIMS.get(figure, ()) if cid in by_id)


def html(result: dict) -> str:
    """The claims table (markdown()) as a stand-alone HTML page, for Snakemake's report."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown(result))
    style = ("body{font-family:sans-serif;max-width:72em;margin:1em auto;line-height:1.4}"
             "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.3em .5em;"
             "vertical-align:top}th{background:#eee}")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Claims</title>'
            f"<style>{style}</style></head><body>\n{body}</body></html>\n")


def metrics(result: dict) -> dict:
    """The verdicts and measured effects as one flat mapping, for `dvc metrics show` and
    `dvc exp show`: ``C1.verdict``, ``C1.spearman_in_claimed_direction.mean``,
    ``C3.lambda0.min_final_over_initial``, ... Numbers (one level of nesting deep) and
    verdicts only; per-group lists, texts and unmeasured (null) values are left out."""
    flat: dict[str, str | int | float] = {}
    for c in result["claims"]:
        for key, value in c.items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in items:
                name = ".".join(str(part) for part in (c["id"], key, sub) if part is not None)
                if (sub or key) == "verdict" or str(sub or key).endswith("_verdict"):
                    flat[name] = str(v)
                elif isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
                    flat[name] = v
    for key, value in result["runs"].items():
        flat[f"runs.{key}"] = value
    for c in (result.get("robustness") or {}).get("claims", []):
        flat[f"robustness.{c['id']}.agree"] = "yes" if c["agree"] else "no"
    return flat


# Each output of `rankbias claims` and its name beside the output stem OUT (OUT.md, ...).
SUFFIXES = {"md": ".md", "json": ".json", "html": ".html", "metrics": ".metrics.json",
            "provenance": ".provenance.json"}


def output_paths(out_stem: str | Path, given: dict[str, str | Path | None] | None = None) -> dict[str, Path]:
    """Where each output (SUFFIXES) goes: the path given for it (the workflow passes each
    declared output), else OUT<suffix>. The provenance record is the table's sidecar
    (provenance.sidecar_path of the .md) and names the JSON beside it, so a provenance
    path other than that, or a JSON in another folder than the .md, is a ValueError
    naming the option and what was expected."""
    out = Path(out_stem)
    chosen: dict[str, str | Path] = {k: v for k, v in (given or {}).items() if v}
    unknown = set(chosen) - set(SUFFIXES)
    if unknown:
        raise ValueError(f"unknown claims output(s) {sorted(unknown)}; expected some of {list(SUFFIXES)}")
    paths = {k: Path(chosen[k]) if k in chosen else out.with_name(out.name + suf) for k, suf in SUFFIXES.items()}
    sidecar = provenance.sidecar_path(paths["md"])
    if "provenance" not in chosen:
        paths["provenance"] = sidecar
    elif paths["provenance"] != sidecar:
        raise ValueError(f"--provenance {paths['provenance']}: expected {sidecar}, the sidecar of "
                         f"--md {paths['md']} (where `rankbias audit` looks for it)")
    if paths["json"].parent != paths["md"].parent:
        raise ValueError(f"--json {paths['json']}: expected in the folder of --md {paths['md']} "
                         f"(its provenance record names the JSON beside it)")
    return paths


def outputs(result: dict, paths: dict[str, Path]) -> dict[Path, bytes]:
    """The .md (the table), the .json (everything), the .html (the table) and the
    .metrics.json (metrics()) at `paths` (output_paths()), rendered; the first two are
    what the provenance record names."""
    return {paths["md"]: markdown(result).encode(),
            paths["json"]: json_bytes(result),
            paths["html"]: html(result).encode(),
            paths["metrics"]: json_bytes(metrics(result))}


def run_claims(config_path: str | Path | None, runs_dir: str | Path, out: str | Path,
               paths: dict[str, str | Path | None] | None = None) -> dict:
    """Judge the claims on the runs of `config_path` (every run in `runs_dir` without one)
    and write OUT.md, OUT.json, OUT.html, OUT.metrics.json and the provenance record
    OUT.provenance.json (or the `paths` given for them, output_paths()) as one set: all
    are checked before anything is judged, rendered and written to temporaries first,
    so an error replaces none of them. A run that fails verification is an error naming
    it, before anything is judged."""
    where = output_paths(out, paths)
    if config_path is not None:
        p = sweep.plan_from_file(config_path)
        ids = list(p.specs)
        present = [i for i in ids if (Path(runs_dir) / i / "run.json").exists()]
        missing = [i for i in ids if i not in present]
        runs = load_runs(runs_dir, present)
        rank, overrides = p.config["rank"], p.config["claims"]
    else:
        runs, missing = load_runs(runs_dir), []
        rank, overrides = {"measure": M.DEFAULT_MEASURE, "normalise": M.DEFAULT_NORMALISE, "tol": M.DEFAULT_TOL,
                           "conv": M.DEFAULT_CONV}, {}
    if missing:
        print(f"warning: {len(missing)} run(s) of the config are not in {runs_dir}", file=sys.stderr)
    refuse_unverified(runs, "claims")
    result = judge(runs, rank["normalise"], rank["tol"], overrides, missing, rank["conv"],
                   rank.get("measure", M.DEFAULT_MEASURE))
    files = outputs(result, where)
    md, js = where["md"], where["json"]
    record = provenance.figure_provenance(runs, {"rank": rank, "claims": overrides,
                                                 "missing_runs": missing}, "claims")
    files[where["provenance"]] = provenance.record_bytes(
        {md.name: files[md], js.name: files[js]}, record)
    atomic_write_set(files)
    return result


def register(subparsers) -> None:
    p = subparsers.add_parser("claims", help="judge the paper's claims C1-C7, its theory T1-T3 and checks R1-R3 on the stored runs",
                              description="Judge claims C1-C7, theory T1-T3 and the checks beyond the paper "
                                          "R1-R3 on whatever runs exist, with a table of C1-C3, R1 and R3 "
                                          "under four rank conventions; writes "
                                          "OUT.md, OUT.json and their provenance "
                                          "OUT.provenance.json (`rankbias audit OUT.md` checks "
                                          "it); the table as OUT.html and the verdicts and effects "
                                          "as OUT.metrics.json (for DVC). Thresholds (config key `claims`): "
                                          + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_THRESHOLDS.items()))
    p.add_argument("--config", default=None,
                   help="config file: judge its runs with its rank settings and thresholds "
                        "(default: every run in --runs, default settings)")
    p.add_argument("--runs", default="results/runs", help="runs directory (default: %(default)s)")
    p.add_argument("--out", default="results/claims", help="output stem (default: %(default)s)")
    for kind, suffix in SUFFIXES.items():
        p.add_argument(f"--{kind}", default=None, metavar="FILE",
                       help=f"write the {kind} output here (default: OUT{suffix})"
                            + ("; the JSON lies beside --md" if kind == "json" else "")
                            + ("; it must be the sidecar of --md, <md stem>.provenance.json"
                               if kind == "provenance" else ""))
    p.add_argument("--table", nargs="?", const="", metavar="CLAIMS_JSON",
                   help="judge nothing: print the verdicts of CLAIMS_JSON (default: --json, else OUT.json) as a "
                        "short table, a row per claim (what `dvc metrics show` prints in one row)")
    p.set_defaults(func=_cmd_claims)


def read_result(path: str | Path) -> dict:
    """A claims.json `rankbias claims` wrote; ValueError naming the file and what was
    expected otherwise."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (`snakemake` or `rankbias claims` writes it)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: expected the JSON `rankbias claims` writes ({e})") from None
    claims = result.get("claims") if isinstance(result, dict) else None
    if not isinstance(claims, list) or not all(isinstance(c, dict) and "id" in c and "verdict" in c
                                               for c in claims):
        raise ValueError(f"{path}: expected an object whose 'claims' is a list of objects with "
                         f"'id' and 'verdict', as `rankbias claims` writes")
    return result


def table(result: dict) -> str:
    """The verdicts as a short plain-text table: a row per claim (id, verdict, runs,
    seeds, each effect's mean and interval), and the runs judged."""
    rows = [("id", "verdict", "runs", "seeds", "effect: mean [interval] (values)")]
    for c in result["claims"]:
        rows.append((str(c["id"]), str(c["verdict"]), str(c.get("n_runs", "-")),
                     str(len(c.get("seeds") or [])), _intervals(c)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    runs = result.get("runs") or {}
    if runs:
        lines.append("runs: " + ", ".join(f"{k} {v}" for k, v in runs.items()))
    return "\n".join(line.rstrip() for line in lines)


def _cmd_claims(args: argparse.Namespace) -> int:
    if args.table is not None:
        print(table(read_result(args.table or output_paths(args.out, {"json": args.json})["json"])))
        return 0
    given = {kind: getattr(args, kind) for kind in SUFFIXES}
    result = run_claims(args.config, args.runs, args.out, given)
    for c in result["claims"]:
        print(f"{c['id']}: {c['verdict']:<12} {_intervals(c)}")
    where = output_paths(args.out, given)
    print("written: " + ", ".join(str(where[k]) for k in ("json", "md", "html", "metrics")))
    return 0
