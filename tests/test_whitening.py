"""jretrieval.whitening against a NumPy float64 re-statement of cirtorch's PCA-whitening.

``cirtorch_learn``/``cirtorch_apply`` restate cirtorch ``utils/whiten.py`` (``pcawhitenlearn``,
``whitenapply``) in float64 with its D x N layout. Eigenvector signs are arbitrary, so the
checks compare similarity matrices of whitened vectors, which do not depend on them.
Tolerances: 1e-4 absolute on similarities in [-1, 1] (float64 learning, float32 apply, against
float64; the smallest eigenvalue kept is >= 1e-3 of the largest here), 1e-5 on eigenvalues
relative to the largest.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from jretrieval import whitening


def cirtorch_learn(x):
    """pcawhitenlearn: x is D x N; returns m [D, 1] and P [D, D] (rows = whitened directions)."""
    n = x.shape[1]
    m = x.mean(axis=1, keepdims=True)
    xc = x - m
    cov = xc @ xc.T
    cov = (cov + cov.T) / (2 * n)
    eigval, eigvec = np.linalg.eig(cov)
    order = eigval.argsort()[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    return m, np.linalg.inv(np.sqrt(np.diag(eigval))) @ eigvec.T


def cirtorch_apply(x, m, p, dims=None):
    """whitenapply: x is D x N, returns dims x N."""
    dims = dims or p.shape[0]
    y = p[:dims, :] @ (x - m)
    return y / (np.linalg.norm(y, ord=2, axis=0, keepdims=True) + 1e-6)


def reference_rank_restricted(x, rank):
    """cirtorch's (m, P) on the first `rank` components only (its well-conditioned part).

    The eigenpairs of the covariance come from a float64 SVD of the centred data (cheaper than
    cirtorch's D x D eig for N << D, same eigenvalues s^2 / N and eigenvectors).
    """
    x64 = x.astype(np.float64).T
    m = x64.mean(axis=1, keepdims=True)
    _, s, vt = np.linalg.svd((x64 - m).T, full_matrices=False)
    eigval, eigvec = (s**2 / x64.shape[1])[:rank], vt[:rank].T
    return m, np.diag(eigval**-0.5) @ eigvec.T


def _data(rng, n, d, decay=0.15):
    """Positive, L2-normalised descriptors with a decaying spectrum (like R-MAC)."""
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    x = (rng.standard_normal((n, d)) * np.exp(-decay * np.arange(d) / 2)) @ basis.T + 0.3
    x = np.maximum(x, 0)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _sims(y):
    y = np.asarray(y, np.float64)
    return y @ y.T


def test_matches_cirtorch_similarities():
    rng = np.random.default_rng(0)
    x = _data(rng, 400, 32)
    test = _data(rng, 50, 32)
    m, p = cirtorch_learn(x.astype(np.float64).T)
    w = whitening.learn_pca(x)
    assert w.mean.shape == (32,) and w.projection.shape == (32, 32) and w.eigenvalues.shape == (32,)
    for dims in (4, 16, 32):
        ref = cirtorch_apply(test.astype(np.float64).T, m, p.real, dims).T
        got = whitening.apply(w, test, dim=dims)
        assert got.shape == (50, dims) and got.dtype == np.float32
        np.testing.assert_allclose(_sims(got), _sims(ref), atol=1e-4, err_msg=f"dim={dims}")
    got = whitening.apply(w, test)  # dim=None keeps all components
    np.testing.assert_allclose(_sims(got), _sims(cirtorch_apply(test.T, m, p.real).T), atol=1e-4)


def test_sorted_eigenpairs_and_unit_rows():
    rng = np.random.default_rng(1)
    x = _data(rng, 300, 24)
    w = whitening.learn_pca(x)
    ev = np.asarray(w.eigenvalues, np.float64)
    ref = np.linalg.eigvalsh(np.cov(x.astype(np.float64).T, bias=True))[::-1]
    np.testing.assert_allclose(ev, ref, atol=1e-5 * ref[0])
    assert np.all(np.diff(ev) <= 0)
    proj = np.asarray(w.projection, np.float64)
    np.testing.assert_allclose(proj.T @ proj, np.eye(24), atol=1e-5)
    np.testing.assert_allclose(np.asarray(w.mean), x.astype(np.float64).mean(0), atol=1e-6)
    # whitened learning set: identity covariance (up to the final L2, checked before it here)
    y = (x - np.asarray(w.mean)) @ proj / np.sqrt(ev)
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(24), atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(whitening.apply(w, x, dim=10), axis=1), 1, atol=1e-5)


def test_fewer_descriptors_than_dimensions_stays_finite():
    # 144 x 2048, as a small learning set against 2048-d R-MAC: rank 143 after centring.
    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_normal((144, 2048)), 0).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = whitening.learn_pca(x)
    assert w.projection.shape == (2048, 144) and w.eigenvalues.shape == (144,)
    ev = np.asarray(w.eigenvalues)
    assert np.all(np.isfinite(np.asarray(w.projection))) and np.all(np.isfinite(ev))
    assert int(np.sum(ev > 0)) == 143 and ev[-1] == 0
    test = np.vstack([x[:20], np.abs(rng.standard_normal((10, 2048))).astype(np.float32)])
    m, p = reference_rank_restricted(x, 143)
    for dims in (64, 144):
        got = np.asarray(whitening.apply(w, np.vstack([x, test]), dim=dims))
        assert np.all(np.isfinite(got))
        ref = cirtorch_apply(x.astype(np.float64).T, m, p, min(dims, 143)).T  # learning set
        np.testing.assert_allclose(_sims(got[:144]), _sims(ref), atol=1e-4, err_msg=f"{dims}")
    assert np.all(got[:, 143] == 0)  # the null-space component is projected out


def test_cirtorch_itself_fails_where_we_do_not():
    # The pitfall this module regularises: N < D makes cirtorch invert a ~0 eigenvalue.
    rng = np.random.default_rng(3)
    x = _data(rng, 10, 32)
    with np.errstate(all="ignore"):
        try:
            m, p = cirtorch_learn(x.astype(np.float64).T)
            failed = not np.all(np.isfinite(cirtorch_apply(x.T, m, p)))
        except np.linalg.LinAlgError:
            failed = True
        if not failed:  # finite but meaningless: ~1e8 scales on round-off directions
            failed = np.abs(p).max() > 1e6
    assert failed
    w = whitening.learn_pca(x)
    assert int(np.sum(np.asarray(w.eigenvalues) > 0)) == 9
    m, p = reference_rank_restricted(x, 9)
    ref = cirtorch_apply(x.astype(np.float64).T, m, p).T
    np.testing.assert_allclose(_sims(whitening.apply(w, x)), _sims(ref), atol=1e-4)


def test_dead_channels_projected_out():
    # N > D but 5 channels are always 0 (dead ReLU units): rank D - 5.
    rng = np.random.default_rng(4)
    x = _data(rng, 300, 40)
    x[:, [0, 7, 8, 20, 39]] = 0
    w = whitening.learn_pca(x)
    ev = np.asarray(w.eigenvalues)
    assert int(np.sum(ev > 0)) == 35 and np.all(ev[35:] == 0)
    got = whitening.apply(w, x)
    assert np.all(np.isfinite(np.asarray(got)))
    m, p = reference_rank_restricted(x, 35)
    ref = cirtorch_apply(x.astype(np.float64).T, m, p).T
    np.testing.assert_allclose(_sims(got), _sims(ref), atol=1e-4)


def test_jit():
    rng = np.random.default_rng(5)
    x = _data(rng, 60, 16)
    w = jax.jit(whitening.learn_pca)(x)
    eager = whitening.learn_pca(x)
    # traced: learned on the device in float32; eager: float64 on the host (the module docstring)
    ev = np.asarray(eager.eigenvalues)
    np.testing.assert_allclose(np.asarray(w.eigenvalues), ev, atol=1e-5 * ev[0])
    y = jax.jit(functools.partial(whitening.apply, dim=8))(w, x)
    ref = whitening.apply(eager, x, dim=8)
    np.testing.assert_allclose(_sims(y), _sims(ref), atol=1e-4)


def test_l2_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(
        np.asarray(whitening.l2_normalize(x)), [[3 / (5 + 1e-6), 4 / (5 + 1e-6)], [0, 0]]
    )


def test_bad_input():
    rng = np.random.default_rng(6)
    x = _data(rng, 30, 8)
    w = whitening.learn_pca(x)
    with pytest.raises(ValueError, match=r"at least 2 descriptors.*\(1, 8\)"):
        whitening.learn_pca(x[:1])
    with pytest.raises(ValueError, match=r"x holds NaN or inf \(shape \(30, 8\)"):
        whitening.learn_pca(np.where(np.arange(8) == 3, np.nan, x))
    with pytest.raises(ValueError, match=r"x must be a \[N, D\]"):
        whitening.learn_pca(x[0])
    with pytest.raises(ValueError, match=r"x has shape \(30, 7\).*D = 8"):
        whitening.apply(w, x[:, :7])
    with pytest.raises(ValueError, match=r"dim=9 is out of range.*8 components"):
        whitening.apply(w, x, dim=9)
    with pytest.raises(ValueError, match=r"dim=0"):
        whitening.apply(w, x, dim=0)
    with pytest.raises(ValueError, match=r"x holds NaN or inf"):
        whitening.apply(w, np.full((2, 8), np.inf, np.float32))
    with pytest.raises(ValueError, match="inconsistent PCAWhitening"):
        whitening.apply(w._replace(eigenvalues=w.eigenvalues[:3]), x)


def _ill_conditioned(rng, n, d, smallest=1e-6):
    """Rows whose covariance eigenvalues fall geometrically from 1 to ``smallest`` (x 0.01)."""
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    spectrum = np.geomspace(1.0, smallest, d)
    return ((rng.standard_normal((n, d)) * np.sqrt(spectrum)) @ basis.T * 0.1 + 0.05).astype(
        np.float32
    )


def test_full_dimension_on_ill_conditioned_data_matches_float64():
    # Full-dimension whitening (Table 3's "True dim." neighbours) where the smallest eigenvalue
    # kept is ~1e-6 of the largest: learned in float64, applied in float32, the similarities
    # match a float64 reference to 1e-5; a float32 eigendecomposition is off by ~0.1 here.
    rng = np.random.default_rng(5)
    x, test = _ill_conditioned(rng, 600, 64), _ill_conditioned(rng, 50, 64)
    x64 = x.astype(np.float64)
    mean = x64.mean(0)
    eigval, eigvec = np.linalg.eigh((x64 - mean).T @ (x64 - mean) / len(x))
    assert 1e-7 < eigval[0] / eigval[-1] < 1e-5
    ref = (test - mean) @ (eigvec / np.sqrt(eigval))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    w = whitening.learn_pca(x)
    assert int(np.sum(np.asarray(w.eigenvalues) > 0)) == 64  # nothing projected out
    got = whitening.apply(w, test)
    assert got.dtype == np.float32
    np.testing.assert_allclose(_sims(got), _sims(ref), atol=1e-5)
    # The float32 learning this replaces (same code, device precision) misses by far more.
    w32 = whitening._learn_impl(jax.numpy.asarray(x), rtol=0.0)
    assert np.abs(_sims(whitening.apply(w32, test)) - _sims(ref)).max() > 1e-3
