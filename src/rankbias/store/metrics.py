"""Spectral metrics: singular values (of matrices and of convolutions), the paper's
rank, stable rank, SGD noise.

Spectra are the stored raw fact; ranks are derived from them at any
(normalisation, tolerance), so re-thresholding never retrains. The ranks are numpy
only; torch is imported by the functions that take tensors (training calls them), so
that drawing figures and judging claims from stored spectra never loads it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rankbias.core.spec import (  # noqa: F401
    CONV_SPECTRA,
    DEFAULT_CONV,
    DEFAULT_MEASURE,
    DEFAULT_NORMALISE,
    DEFAULT_TOL,
    MEASURES,
    NORMALISATIONS,
)

if TYPE_CHECKING:
    import torch


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of a stack of matrices [..., m, n], float64, descending.

    Uses the eigenvalues of the smaller Gram matrix in float64 on w's device: one
    batched eigvalsh instead of an SVD per matrix. Absolute error is about
    1e-15 * sigma_max**2 / sigma, far below any rank tolerance in use.
    """
    import torch

    w = w.detach().to(torch.float64)
    m, n = w.shape[-2], w.shape[-1]
    gram = w @ w.transpose(-1, -2) if m <= n else w.transpose(-1, -2) @ w
    eig = torch.linalg.eigvalsh(gram)
    return eig.clamp_min(0).sqrt().flip(-1)


def conv_kernel_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """A convolution kernel [..., out, in, kh, kw] as the matrix [..., out, in*kh*kw].

    Its singular values are the authors' default spectrum of a convolutional layer:
    each row is one output channel's filter, so its rank counts independent filters.
    """
    if kernel.dim() < 4:
        raise ValueError(f"kernel: expected [..., out, in, kh, kw], got shape {tuple(kernel.shape)}")
    return kernel.reshape(*kernel.shape[:-3], -1)


def conv_operator_singular_values(kernel: torch.Tensor, input_hw: tuple[int, int],
                                  stride: int = 1) -> torch.Tensor:
    """Every singular value of a 2-D convolution's linear operator on (h, w) inputs.

    kernel: [out, in, kh, kw], or a pack's stack [K, out, in, kh, kw]. Returns float64
    on the kernel's device, descending: [out_h * out_w * min(out, in * stride**2)], or
    [K, ...] for a stack (Sedghi, Gupta & Long 2019, "The singular values of
    convolutional layers"; the authors' `eval_rank_conv`).

    Padding is circular (wrap-around), as in Sedghi et al. and the authors' code: that
    operator is block-circulant, so the 2-D DFT block-diagonalises it into one
    [out, in] matrix per spatial frequency and its spectrum is the union of theirs,
    exact, in O(h w out in min(out, in)) rather than the (in h w)^3 of a dense SVD
    (65536^3 for 64 channels at 32x32). Zero ("same") padding, which the layers use
    in training, gives a block-Toeplitz operator with no such decomposition. The two
    operators differ only in the r output rows (channels x positions) within the
    kernel's reach of the border, so their difference has rank <= r and their
    spectra interlace with shift r: sigma_{i+r}(one) <= sigma_i(other).
    Where the padding sits (centred or one-sided) and cross-correlation versus
    convolution change only unit-modulus phases, not singular values.

    A kernel larger than the input wraps around (its taps add up modulo h and w),
    which is what a circular convolution does; the authors' code truncates it there.
    A stride s > 1 (h and w divisible by s) is split into s*s polyphase components:
    a stride-1 convolution on the (h/s, w/s) grid with in*s*s input channels.

    Normalisation: when the kernel fits in the input, the operator's Frobenius norm
    is sqrt(h w / s**2) times the kernel's. The authors divide the kernel by its
    Frobenius norm and then count operator singular values above the tolerance, so
    their tol is this spectrum's "fro"-normalised tol times sqrt(h w / s**2).
    """
    import torch
    import torch.nn.functional as F

    h, w = (int(v) for v in input_hw)
    if kernel.dim() not in (4, 5):
        raise ValueError(f"kernel: expected [out, in, kh, kw] or [K, out, in, kh, kw], "
                         f"got shape {tuple(kernel.shape)}")
    if stride < 1 or h < 1 or w < 1 or h % stride or w % stride:
        raise ValueError(f"input_hw: {(h, w)} must be positive and divisible by the stride {stride}")
    k = kernel.detach().to(torch.float64)
    if stride > 1:
        # tap a = stride*q + r: phase r of the input meets sub-kernel tap q
        s, kh, kw = stride, k.shape[-2], k.shape[-1]
        k = F.pad(k, (0, -kw % s, 0, -kh % s))
        *lead, cout, cin, ph, pw = k.shape
        n = len(lead)
        k = k.reshape(*lead, cout, cin, ph // s, s, pw // s, s)      # [..., out, in, qh, rh, qw, rw]
        k = k.permute(*range(n), n, n + 1, n + 3, n + 5, n + 2, n + 4)
        k = k.reshape(*lead, cout, cin * s * s, ph // s, pw // s)
        h, w = h // s, w // s
    # fold the taps modulo (h, w): the circular kernel on the input grid
    kh, kw = k.shape[-2], k.shape[-1]
    k = F.pad(k, (0, -kw % w, 0, -kh % h))
    k = k.unflatten(-1, (-1, w)).sum(-2).unflatten(-2, (-1, h)).sum(-3)
    blocks = torch.fft.fft2(k).movedim((-2, -1), (-4, -3))        # [..., h, w, out, in]
    sv = torch.linalg.svdvals(blocks).flatten(-3)
    return sv.sort(-1, descending=True).values


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
    """sum sigma^2 / sigma_max^2 = ||W||_F^2 / ||W||_2^2.

    Threshold-free and scale-invariant, between 1 and the rank. A zero matrix has
    stable rank 0 (as its rank is 0); a spectrum with NaN or inf (a diverged run) gives NaN.
    """
    sv = np.asarray(sv, dtype=np.float64)
    top = sv.max(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sr = ((sv / top[..., None]) ** 2).sum(-1)      # scaled first: no under- or overflow
    sr = np.where(top > 0, sr, 0.0)
    return np.where(np.isfinite(sv).all(-1), sr, np.nan)


def rank_measure(sv: np.ndarray, measure: str = DEFAULT_MEASURE, normalise: str = DEFAULT_NORMALISE,
                 tol: float = DEFAULT_TOL) -> np.ndarray:
    """A spectrum's rank under one convention (``rank.measure``), as float [...]: the
    paper's count above tol after `normalise` (``threshold``), the effective rank
    (``effective``) or the stable rank (``stable``); NaN for a spectrum with NaN or inf.
    `normalise` and `tol` matter to ``threshold`` only."""
    if measure == "threshold":
        r = rank(sv, normalise, tol).astype(np.float64)
        return np.where(r < 0, np.nan, r)
    if measure == "effective":
        return effective_rank(sv)
    if measure == "stable":
        return stable_rank(sv)
    raise ValueError(f"rank.measure: {measure!r} is not one of {', '.join(MEASURES)}")


def relative_distance(w_prev: torch.Tensor, w_next: torch.Tensor) -> torch.Tensor:
    """||W_next - W_prev||_F / ||W_prev||_F over the last two dims (float64)."""
    import torch

    a = w_prev.detach().to(torch.float64)
    b = w_next.detach().to(torch.float64)
    return torch.linalg.matrix_norm(b - a) / torch.linalg.matrix_norm(a)


def effective_rank(sv: np.ndarray) -> np.ndarray:
    """Roy & Vetterli's (2007) effective rank: exp of the entropy of sigma / sum(sigma).

    Threshold-free and scale-invariant, between 1 and the number of nonzero singular
    values. A zero matrix has effective rank 0 (as its rank is 0); a spectrum with NaN
    or inf (a diverged run) gives NaN.
    """
    sv = np.asarray(sv, dtype=np.float64)
    total = sv.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = sv / total
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    erank = np.exp(-plogp.sum(-1))
    erank = np.where(total[..., 0] > 0, erank, 0.0)
    return np.where(np.isfinite(sv).all(-1), erank, np.nan)
