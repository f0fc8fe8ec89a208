"""PCA-whitening of descriptor sets (learned without labels), and L2 normalisation.

Shape convention: descriptor sets are row-major ``[N, D]``. ``learn_pca`` returns a
``PCAWhitening`` pytree: ``mean [D]``, ``projection [D, K]`` (orthonormal columns, principal
directions by decreasing eigenvalue) and ``eigenvalues [K]``, with ``K = min(N, D)``.
``apply(w, x, dim=d)`` maps ``[N, D] -> [N, d]``.

The similarities are those of cirtorch's ``pcawhitenlearn`` + ``whitenapply``: the covariance
of the centred data is ``Xc^T Xc / N``, its eigenvectors ``v_i`` sorted by decreasing
eigenvalue ``l_i``, a vector maps to ``((x - mean) . v_i / sqrt(l_i))_{i < d}`` and is then
divided by its L2 norm plus 1e-6. Eigenvector signs are arbitrary, so compare similarities, not
coordinates.

Null space (the regularisation). cirtorch inverts every eigenvalue and fails ("Singular matrix",
or NaN/complex values) when the data do not span ``R^D``: always when ``N <= D`` (the centred
data have rank at most ``N - 1``), and also with dead channels or duplicate images. Here every
eigenvalue ``<= rtol * max_eigenvalue`` is treated as exactly 0 (``rtol`` defaults to
``DEFAULT_RTOL = 1e-9``: far above the float64 round-off of the eigenvalues of a rank-deficient
covariance, about ``1e-13`` for ``D <= 10^4``, and below any component a float32 ``apply`` can
still resolve) and its direction is projected out: the whitened coordinate is 0 (not
``x / sqrt(0)``). This is the same as dropping those components, so similarities equal
cirtorch's restricted to the well-determined components, and everything stays finite.
``learn_pca`` logs the numerical rank and how many directions it projected out. With ``N < D``
the eigenvectors come from the ``N x N`` Gram matrix (cheaper and exact in exact arithmetic);
``K = N``, so ``dim`` can be at most ``N``.

Numerics: ``learn_pca`` computes the mean, the covariance (summed over row blocks) and its
eigendecomposition in float64 on the host with NumPy, as cirtorch does: a one-off ``D x D``
problem, and accelerators may lack float64. In float32 the smallest eigenvalues kept at full
dimension (Table 3's 1024, 2048 and "True dim." neighbours, down to ~1e-6 of the largest) carry
relative errors of order 1, which moved similarities by ~3e-3 against cirtorch. The learned
arrays are stored in float32 and ``apply`` runs in float32 on the device (``Precision.HIGHEST``);
similarities then agree with a float64 pipeline to ~1e-4 even when the smallest eigenvalue kept
is 1e-6 of the largest (``tests/test_whitening.py``). Inside an outer ``jax.jit`` (a traced
``x``) the learning runs on the device in ``x``'s precision instead.

Validation: ``learn_pca`` and ``apply`` check shapes always and NaN/inf when given concrete
arrays (``learn_pca`` before the eigendecomposition, ``apply`` through a flag returned by its
jitted computation), as ``jretrieval.search``; under an outer ``jax.jit`` only shapes are
checked.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jax.typing import ArrayLike

from jretrieval.search import check_descriptors, check_shape, finite_flag, raise_if_not_finite

__all__ = ["DEFAULT_RTOL", "PCAWhitening", "apply", "l2_normalize", "learn_pca"]

_HIGHEST = lax.Precision.HIGHEST
#: eigenvalues ``<= DEFAULT_RTOL * max`` count as 0 (see the module docstring).
DEFAULT_RTOL = 1e-9
#: rows per block of the host covariance sum (bounds its float64 memory: block x D x 8 bytes).
_HOST_BLOCK = 32768


class PCAWhitening(NamedTuple):
    """Learned PCA-whitening (a pytree).

    Attributes:
      mean: ``[D]`` mean of the learning set.
      projection: ``[D, K]`` principal directions as orthonormal columns, by decreasing
        eigenvalue; columns of null-space components are 0.
      eigenvalues: ``[K]`` covariance eigenvalues, decreasing; exactly 0 for null-space
        components (projected out by ``apply``).
    """

    mean: jax.Array
    projection: jax.Array
    eigenvalues: jax.Array


def l2_normalize(x: ArrayLike, *, eps: float = 1e-6) -> jax.Array:
    """Rows divided by their L2 norm plus ``eps`` (cirtorch's ``l2n``): ``[N, D] -> [N, D]``."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize < 4:
        x = x.astype(jnp.float32)
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)


def _float(x: jax.Array) -> jax.Array:
    return x if x.dtype in (jnp.float32, jnp.float64) else x.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("rtol",))
def _learn_impl(x: jax.Array, rtol: float) -> PCAWhitening:
    x = _float(x)
    n, d = x.shape
    mean = jnp.mean(x, axis=0)
    xc = x - mean
    if n >= d:  # eigenvectors of the D x D covariance
        cov = jnp.matmul(xc.T, xc, precision=_HIGHEST) / n
        evals, evecs = jnp.linalg.eigh((cov + cov.T) / 2)
        evals, evecs = evals[::-1], evecs[:, ::-1]
    else:  # N x N Gram matrix: same non-zero eigenvalues, v = Xc^T u (normalised)
        gram = jnp.matmul(xc, xc.T, precision=_HIGHEST) / n
        evals, u = jnp.linalg.eigh((gram + gram.T) / 2)
        evals, u = evals[::-1], u[:, ::-1]
        evecs = jnp.matmul(xc.T, u, precision=_HIGHEST)
        evecs = evecs / jnp.maximum(jnp.linalg.norm(evecs, axis=0, keepdims=True), 1e-30)
    keep = evals > rtol * jnp.maximum(evals[0], 0.0)
    evals = jnp.where(keep, evals, 0.0)
    evecs = jnp.where(keep[None, :], evecs, 0.0)
    return PCAWhitening(mean=mean, projection=evecs, eigenvalues=evals)


def _learn_host(x: ArrayLike, rtol: float, out_dtype: np.dtype) -> PCAWhitening:
    """``_learn_impl`` in float64 with NumPy (rows summed in blocks), stored as ``out_dtype``."""
    x = np.asarray(x)
    n, d = x.shape
    mean = np.zeros(d, np.float64)
    for start in range(0, n, _HOST_BLOCK):
        mean += np.sum(x[start : start + _HOST_BLOCK], axis=0, dtype=np.float64)
    mean /= n
    if n >= d:  # eigenvectors of the D x D covariance
        cov = np.zeros((d, d), np.float64)
        for start in range(0, n, _HOST_BLOCK):
            xc = x[start : start + _HOST_BLOCK].astype(np.float64) - mean
            cov += xc.T @ xc
        evals, evecs = np.linalg.eigh((cov + cov.T) / (2 * n))
        evals, evecs = evals[::-1], evecs[:, ::-1]
    else:  # N x N Gram matrix: same non-zero eigenvalues, v = Xc^T u (normalised)
        xc = x.astype(np.float64) - mean
        gram = xc @ xc.T
        evals, u = np.linalg.eigh((gram + gram.T) / (2 * n))
        evals, u = evals[::-1], u[:, ::-1]
        evecs = xc.T @ u
        evecs /= np.maximum(np.linalg.norm(evecs, axis=0, keepdims=True), 1e-300)
    keep = evals > rtol * max(evals[0], 0.0)
    evals = np.where(keep, evals, 0.0)
    evecs = np.where(keep[None, :], evecs, 0.0)
    return PCAWhitening(
        mean=jnp.asarray(mean, out_dtype),
        projection=jnp.asarray(evecs, out_dtype),
        eigenvalues=jnp.asarray(evals, out_dtype),
    )


def learn_pca(x: ArrayLike, *, rtol: float | None = None) -> PCAWhitening:
    """Learns PCA-whitening from a descriptor set (cirtorch's ``pcawhitenlearn``).

    Args:
      x: ``[N, D]`` descriptors (usually L2-normalised), ``N >= 2``.
      rtol: eigenvalues ``<= rtol * max_eigenvalue`` count as 0 and their directions are
        projected out (see the module docstring); default ``DEFAULT_RTOL`` (1e-9), or
        ``16 * finfo(dtype).eps`` when ``x`` is traced and learned in its own precision.

    Returns:
      ``PCAWhitening`` with ``mean [D]``, ``projection [D, K]``, ``eigenvalues [K]``,
      ``K = min(N, D)``, float32 (float64 for a float64 ``x`` with x64 enabled); learned in
      float64 on the host unless ``x`` is traced.
    """
    check_descriptors(x, "x")
    n, d = jnp.shape(x)
    if n < 2:
        raise ValueError(f"learn_pca needs at least 2 descriptors to learn from, got x {(n, d)}")
    if isinstance(x, jax.core.Tracer):
        if rtol is None:
            rtol = 16 * float(jnp.finfo(_float(x).dtype).eps)
        w = _learn_impl(x, rtol=float(rtol))
    else:
        rtol = DEFAULT_RTOL if rtol is None else float(rtol)
        wide = np.asarray(x).dtype == np.float64 and jax.config.jax_enable_x64
        out_dtype = jnp.float64 if wide else jnp.float32
        w = _learn_host(x, rtol, out_dtype)
    if not isinstance(w.eigenvalues, jax.core.Tracer):
        rank = int(jnp.sum(w.eigenvalues > 0))
        logging.info(
            "learn_pca: %d descriptors of dimension %d, %d components, numerical rank %d "
            "(eigenvalues <= %.1e x max treated as 0); %d directions of R^%d projected out "
            "(whitened coordinate 0)",
            n,
            d,
            min(n, d),
            rank,
            rtol,
            d - rank,
            d,
        )
        if rank < min(n - 1, d):
            logging.warning(
                "learn_pca: the data are rank-deficient (rank %d < min(N - 1, D) = %d): "
                "dead channels or duplicate descriptors?",
                rank,
                min(n - 1, d),
            )
    return w


@functools.partial(jax.jit, static_argnames=("dim",))
def _apply_impl(w: PCAWhitening, x: jax.Array, dim: int) -> jax.Array:
    x = _float(x)
    evals = w.eigenvalues[:dim]
    scale = jnp.where(evals > 0, lax.rsqrt(jnp.where(evals > 0, evals, 1.0)), 0.0)
    # Scaling the [D, dim] projection once is cheaper than scaling the [N, dim] result; its
    # transpose is materialised (barrier) because XLA's CPU dot is faster contracting the
    # minor dimension of both operands.
    pt = lax.optimization_barrier((w.projection[:, :dim] * scale).T)  # [dim, D]
    y = lax.dot_general(x - w.mean, pt, (((1,), (1,)), ((), ())), precision=_HIGHEST)
    return y / (jnp.linalg.norm(y, axis=-1, keepdims=True) + 1e-6), finite_flag(x)


def apply(w: PCAWhitening, x: ArrayLike, *, dim: int | None = None) -> jax.Array:
    """Projects, whitens, keeps the first ``dim`` components and L2-normalises (``whitenapply``).

    Args:
      w: a ``PCAWhitening`` from ``learn_pca`` (``mean [D]``, ``projection [D, K]``).
      x: ``[N, D]`` descriptors.
      dim: components kept (static), ``1 <= dim <= K``; ``None`` keeps all ``K``.

    Returns:
      ``[N, dim]`` rows of unit norm (null-space components are 0; a row lying entirely in the
      null space maps to 0).
    """
    d, k = jnp.shape(w.projection)
    if jnp.shape(w.mean) != (d,) or jnp.shape(w.eigenvalues) != (k,):
        raise ValueError(
            f"inconsistent PCAWhitening: mean {jnp.shape(w.mean)}, projection {(d, k)}, "
            f"eigenvalues {jnp.shape(w.eigenvalues)} (expected [D], [D, K], [K])"
        )
    check_shape(x, "x")
    if jnp.shape(x)[1] != d:
        raise ValueError(f"x has shape {tuple(jnp.shape(x))} but the whitening expects D = {d}")
    if dim is None:
        dim = k
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= k:
        raise ValueError(
            f"dim={dim!r} is out of range: the whitening has {k} components (projection "
            f"{(d, k)}; K = min(N, D) of its learning set), expected 1 <= dim <= {k}"
        )
    y, finite = _apply_impl(w, jnp.asarray(x), dim=dim)
    raise_if_not_finite(finite, x=x)
    return y
