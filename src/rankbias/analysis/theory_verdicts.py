"""The theory's verdicts T1-T3, judged from the tables `rankbias.train.theory` stores with
each run (theory.parquet, lemmas.parquet), and those tables' names and columns.
Numpy and pandas only: the claims job reads stored results and never imports torch.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from rankbias.store.theory_tables import LEMMA1_SAMPLES, LEMMA_COLUMNS, LEMMAS_FILE, THEORY_COLUMNS, THEORY_FILE  # noqa: F401

# -- verdicts --------------------------------------------------------------------------

STATEMENTS = {
    "T1": "Lemma 1: without BatchNorm, the gradient of each output, and of the loss, at a "
          "single input has rank at most 1 in every weight matrix.",
    "T2": "Lemma 2: the gradient of a batch loss over B samples has rank at most B in every "
          "weight matrix, with or without BatchNorm.",
    "T3": "Theorem 1: with weight decay λ > 0, every weight matrix lies within ‖G_S‖_F / λ of "
          "a matrix of rank at most B*, for every batch S of size B*.",
}
SHOWN_VIOLATIONS = 20


def _verdict(n_checked: int, violations: list) -> str:
    if not n_checked:
        return "insufficient"
    return "fails" if violations else "holds"


def _seeds(runs) -> list[int]:
    return sorted({int(r.spec.seed) for r in runs})


def verdicts(runs) -> list[dict]:
    """T1-T3 from the runs' lemmas.parquet and theory.parquet (runs without them count
    for nothing). Every check is exact: a rank above its bound, or left above right, is
    a violation and is named with its run, matrix, epoch and both sides."""
    lemma, theory, skipped = [], [], 0
    for r in runs:
        lm, th = r.table(LEMMAS_FILE), r.table(THEORY_FILE)
        if lm is not None and len(lm):
            lemma.append(lm.assign(run_id=r.run_id))
        if th is not None and len(th):
            theory.append(th.assign(run_id=r.run_id))
        if (r.info.get("theory") or {}).get("theorem1", "measured") != "measured":
            skipped += 1
    lm = pd.concat(lemma, ignore_index=True) if lemma else pd.DataFrame(columns=LEMMA_COLUMNS + ["run_id"])
    th = pd.concat(theory, ignore_index=True) if theory else pd.DataFrame(columns=THEORY_COLUMNS + ["run_id"])
    by_id = {r.run_id: r for r in runs}
    return [_t1(lm[lm["lemma"] == 1], by_id), _t2(lm[lm["lemma"] == 2], th, by_id), _t3(th, by_id, skipped)]


def setting(specs) -> dict:
    """The setting a verdict rests on, from the specs (RunSpec) of the runs it judged:
    models, datasets, training-set sizes, epochs and seeds, each sorted and distinct."""
    specs = list(specs)
    return {"models": sorted({s.model for s in specs}), "datasets": sorted({s.dataset for s in specs}),
            "train_sizes": sorted({s.sizes()[0] for s in specs}), "epochs": sorted({s.epochs for s in specs}),
            "seeds": sorted({s.seed for s in specs})}


def setting_text(st: dict | None) -> str:
    """One line: 'MLP-BN-10-100 on mnist (10000 training examples), 100 epochs, seeds 0, 1, 2'."""
    if not st or not st["models"]:
        return "no runs"
    def j(xs):
        return ", ".join(map(str, xs))
    return (f"{j(st['models'])} on {j(st['datasets'])} ({j(st['train_sizes'])} training examples), "
            f"{j(st['epochs'])} epochs, seeds {j(st['seeds'])}")


def _rank_violations(df: pd.DataFrame) -> list[dict]:
    bad = df[df["rank"] > df["bound"]]
    return [{"run_id": v.run_id, "matrix": v.layer, "epoch": int(v.epoch), "stage": v.stage,
             "gradient": v.gradient, "sample": int(v.sample), "batch_size": int(v.batch_size),
             "rank": int(v.rank), "bound": int(v.bound)} for v in bad.itertuples()]


def _result(cid, n_checked, violations, ids, by_id, effect, rule, **counts) -> dict:
    return {"id": cid, "statement": STATEMENTS[cid], "verdict": _verdict(n_checked, violations),
            "effect": effect, "rule": rule, "n_runs": len(ids), "seeds": _seeds(by_id[i] for i in ids),
            "setting": setting(by_id[i].spec for i in ids),
            "n_violations": len(violations), "violations": violations[:SHOWN_VIOLATIONS], **counts}


def _t1(df: pd.DataFrame, by_id) -> dict:
    viol = _rank_violations(df)
    ids = sorted(set(df["run_id"]))
    counts = {"n_gradients": len(df),
              "n_matrices": len(df.drop_duplicates(["run_id", "layer"])),
              "n_samples": len(df.drop_duplicates(["run_id", "stage", "sample"])),
              "n_epochs": len(df.drop_duplicates(["run_id", "epoch"]))}
    top = int(df["rank"].max()) if len(df) else None
    effect = (f"max rank {top} over {counts['n_gradients']} per-sample gradients "
              f"({counts['n_matrices']} matrices, {counts['n_samples']} samples, "
              f"{counts['n_epochs']} epochs); {len(viol)} above 1")
    rule = ("For each run without BatchNorm, at epoch 0 and after the last epoch, "
            f"{LEMMA1_SAMPLES} training inputs: the rank of ∂f_c(x)/∂W for every output c and of "
            "the per-sample loss gradient, for every weight matrix (Frobenius-normalised, "
            "σ > 1e-3). Holds when none exceeds 1.")
    return _result("T1", len(df), viol, ids, by_id, effect, rule, **counts)


def _t2(df: pd.DataFrame, th: pd.DataFrame, by_id) -> dict:
    viol = _rank_violations(df)
    bad = th[th["grad_rank_max"] > th["batch_size"]]
    viol += [{"run_id": v.run_id, "matrix": v.layer, "epoch": int(v.epoch), "stage": "training",
              "gradient": "batch loss", "sample": -1, "batch_size": int(v.batch_size),
              "rank": int(v.grad_rank_max), "bound": int(v.batch_size)} for v in bad.itertuples()]
    ids = sorted(set(df["run_id"]) | set(th["run_id"]))
    pairs = pd.concat([df[["run_id", "layer"]], th[["run_id", "layer"]]])
    epochs = pd.concat([df[["run_id", "epoch"]], th[["run_id", "epoch"]]])
    n_grad = len(df) + int(th["n_batches"].sum()) if len(th) else len(df)
    binding = df[df["batch_size"] < df["max_rank"]]
    tight = float((binding["rank"] >= binding["bound"] - 1).mean()) if len(binding) else float("nan")
    batch_sizes = sorted(int(b) for b in set(df["batch_size"]) | set(th["batch_size"]))
    counts = {"n_gradients": n_grad, "n_matrices": len(pairs.drop_duplicates()),
              "n_epochs": len(epochs.drop_duplicates()), "batch_sizes": batch_sizes,
              "fraction_at_bound": None if np.isnan(tight) else round(tight, 3)}
    effect = (f"{n_grad} batch gradients ({counts['n_matrices']} matrices, {counts['n_epochs']} "
              f"epochs, B in {batch_sizes[:1] + batch_sizes[-1:]}); "
              f"{len(viol)} above B; rank within 1 of B where B < the matrix's size: "
              f"{counts['fraction_at_bound']}")
    rule = ("The rank of the batch-loss gradient of every weight matrix (Frobenius-normalised, "
            "σ > 1e-3), BatchNorm in training mode, not detached: a sweep of B across and past "
            "the width at epoch 0 and after the last epoch, and the batches of size B* sampled "
            "for Theorem 1 at every logged epoch. Holds when none exceeds B. "
            "'Within 1 of B' reports how tightly the bound binds (BatchNorm's centring takes one).")
    return _result("T2", n_grad, viol, ids, by_id, effect, rule, **counts)


def _t3(th: pd.DataFrame, by_id, skipped: int) -> dict:
    bad = th[th["left"] > th["right"]]
    viol = [{"run_id": v.run_id, "matrix": v.layer, "epoch": int(v.epoch), "batch_size": int(v.batch_size),
             "left": float(v.left), "right": float(v.right)} for v in bad.itertuples()]
    ids = sorted(set(th["run_id"]))
    hidden = th[th["kind"] == "hidden"]["ratio"].astype(float)
    hidden = hidden[np.isfinite(hidden)]
    median = float(np.median(hidden)) if len(hidden) else None
    counts = {"n_checks": len(th), "n_matrices": len(th.drop_duplicates(["run_id", "layer"])),
              "n_epochs": len(th.drop_duplicates(["run_id", "epoch"])),
              "n_batches": int(th["n_batches"].sum()) if len(th) else 0,
              "median_ratio": None if median is None else float(f"{median:.4g}"),
              "max_ratio": float(f"{th['ratio'].max():.4g}") if len(th) else None,
              "n_runs_skipped_lambda0": skipped}
    effect = (f"left ≤ right in {len(th) - len(viol)} of {len(th)} (run, matrix, epoch, B*) checks "
              f"({counts['n_matrices']} matrices, {counts['n_epochs']} epochs); median left/right "
              f"{counts['median_ratio']} (hidden matrices), max {counts['max_ratio']}; "
              f"{skipped} run(s) with λ = 0 skipped")
    rule = ("At epoch 0 and every logged epoch of every run with weight decay λ > 0 (torch's "
            "coupled λ: G_S = ∇L_S + λW, the paper's λ is λ/2), for every weight matrix: left = "
            "sqrt(Σ_{i>B*} σ_i(W)²) from the stored spectrum, right = min over the sampled "
            "batches S of size B* of ‖G_S‖_F / λ. Holds when left ≤ right at every check; the "
            "median left/right over the hidden matrices says how tight the bound is.")
    return _result("T3", len(th), viol, ids, by_id, effect, rule, **counts)
