"""Fabricated runs for unit tests: files exactly as `rankbias train` writes them, with
chosen ranks, distances and accuracies (a hidden matrix of rank r gets r unit singular
values and tiny ones after, so its Frobenius-normalised rank at tol 1e-3 is r)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from rankbias.store.results import write_run
from rankbias.core.spec import RunSpec


def fabricate(runs_dir: str | Path, spec: RunSpec, layer_ranks: Sequence[Sequence[int]] | None = None,
              final_ranks: Sequence[int] | None = None, distance: Sequence[float] | None = None,
              train_acc: Sequence[float] | None = None, test_acc: Sequence[float] | None = None,
              diverged_at: int | None = None, tables: dict[str, pd.DataFrame] | None = None,
              theory: dict | None = None, tail: float = 1e-7) -> Path:
    """Write one run. `layer_ranks[e][l]`: rank of hidden matrix l at epoch e; or give
    `final_ranks` (per hidden matrix: every one but the output layer) and ranks go
    linearly from full to those. `tables` (file name -> frame) and `theory` (run.json's
    theory record) as rankbias.train.theory writes them. `tail`: the singular values beyond
    each matrix's rank (unit ones up to it)."""
    E = spec.epochs
    # the stored matrices, named and shaped as the model defines them
    layers = spec.layer_table().layers
    names = [layer.name for layer in layers]
    hidden = [layer for layer in layers if layer.kind != "output"]
    n_hidden = len(hidden)
    if layer_ranks is None:
        final = list(final_ranks) if final_ranks is not None else [min(l.shape) for l in hidden]
        layer_ranks = [[round(min(l.shape) + (f - min(l.shape)) * e / E) for l, f in zip(hidden, final)]
                       for e in range(E + 1)]
    layer_ranks = np.asarray(layer_ranks)
    assert layer_ranks.shape == (E + 1, n_hidden)
    epochs = np.arange(E + 1)
    spectra = {"epochs": epochs, "layers": np.array(names)}
    for i, layer in enumerate(hidden):
        sv = np.full((E + 1, min(layer.shape)), tail)
        for e in range(E + 1):
            sv[e, :layer_ranks[e, i]] = 1.0
        spectra[f"sv_{i}"] = sv
    spectra[f"sv_{n_hidden}"] = np.ones((E + 1, min(layers[-1].shape)))
    dist = np.r_[np.nan, np.asarray(distance, float)] if distance is not None else np.r_[np.nan, np.full(E, 0.1)]
    tr = np.asarray(train_acc, float) if train_acc is not None else np.linspace(0.1, 0.99, E + 1)
    te = np.asarray(test_acc, float) if test_acc is not None else tr * 0.97
    div = np.zeros(E + 1, bool)
    if diverged_at is not None:
        div[diverged_at:] = True
        for k in list(spectra):
            if k.startswith("sv_"):
                spectra[k][diverged_at:] = np.nan
        tr = tr.copy()
        tr[diverged_at:] = np.nan
        dist[diverged_at:] = np.nan
    mean_rank = layer_ranks.mean(1).astype(float)
    metrics = pd.DataFrame({"epoch": epochs, "logged": True, "lr": spec.lr, "step_loss": 1.0 - tr * 0.9,
                            "train_loss": 1.0 - tr * 0.9, "train_acc": tr, "test_loss": 1.0 - te * 0.9,
                            "test_acc": te, "distance": dist, "mean_rank": mean_rank, "diverged": div})
    rows = []
    for e in epochs:
        for i, n in enumerate(names):
            rows.append((int(e), n, i, layers[i].kind, float(dist[e]), 1.0))
    layers = pd.DataFrame(rows, columns=["epoch", "layer", "index", "kind", "distance", "weight_norm"])
    run_json = {"run_id": spec.run_id, "spec": spec.to_dict(), "model": spec.model, "pack_id": "test",
                "status": "complete", "epochs_completed": E,
                "diverged": None if diverged_at is None else {"epoch": diverged_at, "reason": "nan loss"},
                "provenance": {}, **({"theory": theory} if theory is not None else {})}
    path = Path(runs_dir) / spec.run_id
    write_run(path, run_json, metrics, layers, spectra, tables)
    return path
