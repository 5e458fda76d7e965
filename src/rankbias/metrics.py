"""Spectral metrics: singular values, the paper's rank, stable rank, SGD noise.

Spectra are the stored raw fact; ranks are derived from them at any
(normalisation, tolerance), so re-thresholding never retrains.
"""
from __future__ import annotations

import numpy as np
import torch

from .spec import DEFAULT_NORMALISE, DEFAULT_TOL, NORMALISATIONS


@torch.no_grad()
def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of a stack of matrices [..., m, n], float64, descending.

    Uses the eigenvalues of the smaller Gram matrix in float64 on w's device: one
    batched eigvalsh instead of an SVD per matrix. Absolute error is about
    1e-15 * sigma_max**2 / sigma, far below any rank tolerance in use.
    """
    w = w.detach().to(torch.float64)
    m, n = w.shape[-2], w.shape[-1]
    gram = w @ w.transpose(-1, -2) if m <= n else w.transpose(-1, -2) @ w
    eig = torch.linalg.eigvalsh(gram)
    return eig.clamp_min(0).sqrt().flip(-1)


def normalised(sv: np.ndarray, normalise: str = DEFAULT_NORMALISE) -> np.ndarray:
    sv = np.asarray(sv, dtype=np.float64)
    if normalise == "fro":
        scale = np.sqrt((sv ** 2).sum(-1, keepdims=True))
    elif normalise == "max":
        scale = sv.max(-1, keepdims=True)
    elif normalise == "none":
        return sv
    else:
        raise ValueError(f"normalise: {normalise!r} is not one of {', '.join(NORMALISATIONS)}")
    with np.errstate(invalid="ignore", divide="ignore"):
        return sv / scale


def rank(sv: np.ndarray, normalise: str = DEFAULT_NORMALISE, tol: float = DEFAULT_TOL) -> np.ndarray:
    """The paper's rank: normalise W, count singular values above tol.

    sv: [..., n] singular values. Returns an int array of shape [...]; a spectrum
    with NaN (a diverged run) or all zeros has rank -1 / 0 respectively.
    """
    if not tol > 0:
        raise ValueError(f"tol: must be > 0, got {tol!r}")
    sv = np.asarray(sv, dtype=np.float64)
    r = (normalised(sv, normalise) > tol).sum(-1)
    bad = ~np.isfinite(sv).all(-1)
    return np.where(bad, -1, r)


def stable_rank(sv: np.ndarray) -> np.ndarray:
    """sum sigma^2 / sigma_max^2."""
    sv = np.asarray(sv, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sv ** 2).sum(-1) / sv.max(-1) ** 2


@torch.no_grad()
def relative_distance(w_prev: torch.Tensor, w_next: torch.Tensor) -> torch.Tensor:
    """||W_next - W_prev||_F / ||W_prev||_F over the last two dims (float64)."""
    a = w_prev.detach().to(torch.float64)
    b = w_next.detach().to(torch.float64)
    return torch.linalg.matrix_norm(b - a) / torch.linalg.matrix_norm(a)
