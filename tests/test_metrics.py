"""Spectra against numpy's float64 SVD; the paper's rank; the distance on hand-made weights."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankbias.store import metrics as M


def _low_rank(rng, m, n, r, scale=1.0):
    return (rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) * scale
            + 1e-9 * rng.standard_normal((m, n)))


@pytest.mark.parametrize("shape", [(100, 3072), (100, 100), (10, 100), (2000, 300), (7, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_singular_values_match_numpy(shape, dtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3,) + shape)
    w[1] = _low_rank(rng, *shape, r=min(shape) // 3 + 1)
    w[2] *= np.logspace(0, -6, shape[-1])          # a wide dynamic range of singular values
    t = torch.tensor(w, dtype=dtype)
    ours = M.singular_values(t).numpy()
    ref = np.linalg.svd(t.double().numpy(), compute_uv=False)
    assert ours.shape == ref.shape and ours.dtype == np.float64
    top = ref[:, :1]
    # 1e-6 relative for every sigma that any rank tolerance in use (>= 1e-5 * sigma_max) can see,
    # and 1e-6 of sigma_max for the rest
    big = ref >= 1e-3 * top
    np.testing.assert_allclose(ours[big], ref[big], rtol=1e-6)
    assert np.all(np.abs(ours - ref) <= 1e-6 * top)


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 12), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_rank_of_constructed_matrices(m, n, r, seed):
    """A product of m x r and r x n Gaussian factors has rank min(m, n, r)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) if r else np.zeros((m, n))
    sv = M.singular_values(torch.tensor(w)).numpy()
    expected = np.linalg.matrix_rank(w)
    # the Gram route resolves sigma down to ~1e-7 sigma_max, far below any tolerance in use
    assert M.rank(sv, "max", 1e-6) == expected


def test_rank_normalisation_and_tolerance():
    sv = np.array([10.0, 1.0, 0.05, 0.001, 0.0])
    fro = np.sqrt((sv ** 2).sum())
    assert M.rank(sv, "none", 0.01) == 3
    assert M.rank(sv, "max", 0.01) == 2                 # 0.05 / 10 = 0.005 < 0.01
    assert M.rank(sv, "fro", 1e-3) == int((sv / fro > 1e-3).sum()) == 3
    assert M.rank(sv, "fro", 5e-5) == 4
    assert M.rank(np.zeros(4)) == 0
    assert M.rank(np.array([1.0, np.nan])) == -1          # a diverged matrix
    np.testing.assert_array_equal(M.rank(np.stack([sv, sv[::-1]]), "max", 0.01), [2, 2])
    with pytest.raises(ValueError, match="normalise"):
        M.rank(sv, "spectral", 0.01)
    with pytest.raises(ValueError, match="tol"):
        M.rank(sv, "fro", 0)


def test_stable_rank():
    assert M.stable_rank(np.array([2.0, 2.0, 2.0])) == pytest.approx(3.0)
    assert M.stable_rank(np.array([3.0, 0.0])) == pytest.approx(1.0)
    assert M.stable_rank(np.array([2.0, 1.0])) == pytest.approx(1.25)


def test_relative_distance_on_hand_made_weights():
    a = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])            # ||a||_F = 5
    b = a + torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])        # moved by 1
    assert M.relative_distance(a, b).item() == pytest.approx(0.2)
    assert M.relative_distance(a, a).item() == 0.0
    k = torch.stack([a[0], 2 * a[0]])                       # per member
    np.testing.assert_allclose(M.relative_distance(k, k * 1.5).numpy(), [0.5, 0.5])


def _dense_circular_conv(kernel, h, w, stride):
    """The matrix of x -> circular cross-correlation of x with `kernel` at `stride`, built
    column by column: the convolution applied to each basis image of the input space."""
    cout, cin, kh, kw = kernel.shape
    basis = torch.eye(cin * h * w, dtype=torch.float64).view(-1, cin, h, w)
    # periodic input: tile it until every tap of every output position lands on a copy
    tiled = basis.repeat(1, 1, -(-(h + kh) // h), -(-(w + kw) // w))
    out = torch.nn.functional.conv2d(tiled, kernel, stride=stride)[:, :, :h // stride, :w // stride]
    return out.reshape(cin * h * w, -1).T.numpy()            # [out*h'*w', in*h*w]


@pytest.mark.parametrize("cout, cin, kh, kw, h, w, stride", [
    (3, 2, 3, 3, 5, 6, 1),      # 3x3 same-size convolution, non-square input
    (4, 4, 3, 3, 4, 4, 1),
    (1, 3, 3, 2, 4, 5, 1),      # non-square kernel
    (5, 1, 1, 1, 3, 3, 1),      # pointwise
    (2, 2, 5, 5, 3, 3, 1),      # kernel larger than the input: taps wrap around
    (2, 3, 2, 2, 6, 4, 2),      # the ConvNet's stride-2 2x2 convolutions
    (3, 2, 3, 3, 6, 6, 2),      # stride 2 with a kernel that does not tile it
    (2, 2, 3, 3, 6, 3, 3),
])
def test_conv_operator_singular_values_match_the_dense_operator(cout, cin, kh, kw, h, w, stride):
    rng = np.random.default_rng(cout * 100 + kh * 10 + stride)
    kernels = torch.tensor(rng.standard_normal((3, cout, cin, kh, kw)))
    kernels[1] *= torch.logspace(0, -4, cout, dtype=torch.float64).view(-1, 1, 1, 1)
    ours = M.conv_operator_singular_values(kernels, (h, w), stride=stride)
    single = M.conv_operator_singular_values(kernels[0].float(), (h, w), stride=stride)
    assert ours.dtype == single.dtype == torch.float64
    for k in range(3):
        dense = _dense_circular_conv(kernels[k], h, w, stride)
        ref = np.linalg.svd(dense, compute_uv=False)
        n = min(dense.shape)
        assert ours.shape[-1] == n
        np.testing.assert_allclose(ours[k].numpy(), ref[:n], rtol=1e-9, atol=1e-12 * ref[0])
    np.testing.assert_allclose(single.numpy(), ours[0].numpy(), rtol=1e-5, atol=1e-6 * ours[0, 0].item())


def test_conv_operator_norm_and_stride_two_by_two():
    """Parseval: the operator's Frobenius norm is sqrt(h w) that of its kernel; a
    stride-2 2x2 convolution acts on each 2x2 patch alone, so its spectrum is the
    kernel matrix's, once per output position."""
    rng = np.random.default_rng(1)
    k = torch.tensor(rng.standard_normal((4, 3, 3, 3)))
    sv = M.conv_operator_singular_values(k, (6, 5))
    assert (sv ** 2).sum().sqrt().item() == pytest.approx(np.sqrt(30) * k.norm().item(), rel=1e-12)
    k2 = torch.tensor(rng.standard_normal((5, 3, 2, 2)))
    sv2 = M.conv_operator_singular_values(k2, (8, 6), stride=2).numpy()
    patch = np.linalg.svd(k2.reshape(5, -1).numpy(), compute_uv=False)
    np.testing.assert_allclose(sv2, np.sort(np.tile(patch, 12))[::-1], rtol=1e-10)


def test_conv_operator_rejects_bad_shapes():
    with pytest.raises(ValueError, match="kernel"):
        M.conv_operator_singular_values(torch.zeros(3, 3, 3), (4, 4))
    with pytest.raises(ValueError, match="input_hw"):
        M.conv_operator_singular_values(torch.zeros(2, 2, 3, 3), (5, 4), stride=2)
    with pytest.raises(ValueError, match="kernel"):
        M.conv_kernel_matrix(torch.zeros(3, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_conv_operator_runs_on_the_kernels_device():
    k = torch.randn(2, 4, 3, 3, 3, device="cuda")
    sv = M.conv_operator_singular_values(k, (8, 8))
    assert sv.device == k.device
    np.testing.assert_allclose(sv.cpu().numpy(), M.conv_operator_singular_values(k.cpu(), (8, 8)).numpy(),
                               rtol=1e-5, atol=1e-6 * sv.max().item())


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (4, 16, 3, 3), (2, 5, 8, 2, 2)])
def test_conv_kernel_matrix_spectrum_matches_numpy(shape):
    rng = np.random.default_rng(2)
    k = torch.tensor(rng.standard_normal(shape))
    mat = M.conv_kernel_matrix(k)
    assert mat.shape == shape[:-3] + (int(np.prod(shape[-3:])),)       # [..., out, in*kh*kw]
    ref = np.linalg.svd(k.numpy().reshape(*shape[:-3], -1), compute_uv=False)
    np.testing.assert_allclose(M.singular_values(mat).numpy(), ref, rtol=1e-9, atol=1e-12 * ref.max())


def _effective_rank_direct(w: np.ndarray) -> float:
    """Roy & Vetterli's definition computed from numpy's SVD of the matrix itself."""
    s = np.linalg.svd(w, compute_uv=False)
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("m, n, r", [(50, 80, 50), (60, 40, 7), (30, 30, 1)])
def test_effective_and_stable_rank_match_numpy_on_stored_spectra(m, n, r):
    rng = np.random.default_rng(r)
    w = rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) * np.logspace(0, -2, n)
    sv = M.singular_values(torch.tensor(w)).numpy()
    # the Gram route leaves the zero singular values at ~1e-8 sigma_max instead of ~1e-16:
    # their share of the entropy stays below 1e-5
    assert M.effective_rank(sv) == pytest.approx(_effective_rank_direct(w), rel=1e-5)
    two = np.linalg.norm(w, 2)
    assert M.stable_rank(sv) == pytest.approx(np.linalg.norm(w, "fro") ** 2 / two ** 2, rel=1e-9)
    assert 1.0 - 1e-12 <= M.effective_rank(sv) <= r + 1e-5


def test_effective_rank_edge_cases():
    assert M.effective_rank(np.full(7, 3.0)) == pytest.approx(7.0)      # flat spectrum: all count
    assert M.effective_rank(np.array([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert M.effective_rank(np.zeros(4)) == 0.0
    assert np.isnan(M.effective_rank(np.array([1.0, np.nan])))
    batch = np.stack([np.full(4, 1.0), np.array([2.0, 0.0, 0.0, 0.0])])
    np.testing.assert_allclose(M.effective_rank(batch), [4.0, 1.0])
    assert M.effective_rank(np.array([1.0, 1.0]) * 1e6) == pytest.approx(2.0)   # scale-free


@pytest.mark.parametrize("m, n, r", [(50, 80, 50), (60, 40, 7), (30, 30, 1)])
def test_every_rank_measure_matches_numpy_svd(m, n, r):
    """rank.measure's four conventions against numpy's SVD of the matrix itself."""
    rng = np.random.default_rng(10 + r)
    w = rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) * np.logspace(0, -4, n)
    sv = M.singular_values(torch.tensor(w)).numpy()
    s = np.linalg.svd(w, compute_uv=False)
    tol = 1e-3
    assert M.rank_measure(sv, "threshold", "fro", tol) == (s / np.linalg.norm(w, "fro") > tol).sum()
    assert M.rank_measure(sv, "threshold", "max", tol) == np.linalg.matrix_rank(w, tol=tol * s[0])
    assert M.rank_measure(sv, "effective") == pytest.approx(_effective_rank_direct(w), rel=1e-5)
    assert M.rank_measure(sv, "stable") == pytest.approx(
        np.linalg.norm(w, "fro") ** 2 / np.linalg.norm(w, 2) ** 2, rel=1e-9)


def test_rank_measure_edge_cases():
    batch = np.array([[1.0, 1.0, 0.0], [np.nan, 1.0, 1.0], [0.0, 0.0, 0.0]])
    for measure in M.MEASURES:
        out = M.rank_measure(batch, measure)
        assert out.dtype == np.float64 and out.shape == (3,)
        assert out[0] == pytest.approx(2.0) and np.isnan(out[1]) and out[2] == 0.0
    assert M.stable_rank(np.array([2.0, 2.0, 0.0]) * 1e-200) == pytest.approx(2.0)   # tiny, not zero
    with pytest.raises(ValueError, match="measure"):
        M.rank_measure(batch, "nuclear")
