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
``16 * finfo(float32).eps``, about 2e-6, some 20x above the float32 round-off level of the
eigenvalues of a rank-deficient covariance) and its direction is projected out: the whitened
coordinate is 0 (not ``x / sqrt(0)``). This is the same as dropping those components, so
similarities equal cirtorch's restricted to the well-determined components, and everything
stays finite. ``learn_pca`` logs the numerical rank and how many directions it projected out.
With ``N < D`` the eigenvectors come from the ``N x N`` Gram matrix (cheaper and exact in
exact arithmetic); ``K = N``, so ``dim`` can be at most ``N``.

Numerics: computed in float32 (in float64 when x64 is enabled and x is float64); the
covariance uses ``Precision.HIGHEST``. Against a float64 reference, similarities agree to
~1e-6 for the leading components and ~1e-4 when the smallest eigenvalue kept is ~1e-4 of the
largest.

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
from absl import logging
from jax import lax
from jax.typing import ArrayLike

from jretrieval.search import check_descriptors, check_shape, finite_flag, raise_if_not_finite

__all__ = ["PCAWhitening", "apply", "l2_normalize", "learn_pca"]

_HIGHEST = lax.Precision.HIGHEST


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


def learn_pca(x: ArrayLike, *, rtol: float | None = None) -> PCAWhitening:
    """Learns PCA-whitening from a descriptor set (cirtorch's ``pcawhitenlearn``).

    Args:
      x: ``[N, D]`` descriptors (usually L2-normalised), ``N >= 2``.
      rtol: eigenvalues ``<= rtol * max_eigenvalue`` count as 0 and their directions are
        projected out (see the module docstring); default ``16 * finfo(dtype).eps``.

    Returns:
      ``PCAWhitening`` with ``mean [D]``, ``projection [D, K]``, ``eigenvalues [K]``,
      ``K = min(N, D)``.
    """
    check_descriptors(x, "x")
    n, d = jnp.shape(x)
    if n < 2:
        raise ValueError(f"learn_pca needs at least 2 descriptors to learn from, got x {(n, d)}")
    x = jnp.asarray(x)
    if rtol is None:
        rtol = 16 * float(jnp.finfo(_float(x).dtype).eps)
    w = _learn_impl(x, rtol=float(rtol))
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
