"""Argument checks of the retrieval functions, written once for one device and a mesh alike.

Shape convention: descriptor sets are ``[N, D]`` float rows (``queries [Q, D]``,
``database [N, D]``), given as NumPy arrays, JAX arrays or ``jretrieval.mesh.Sharded`` rows.

Every public entry point of ``search``, ``expansion`` and ``diffusion`` checks its arguments
here, before it places anything on a device, so a bad argument gets the same ``ValueError``
(naming the argument, its shape and what was expected) whether ``mesh`` is given or not.

Shapes, ``k`` and block sizes are checked eagerly and cheaply (no values read; this also works
on tracers under an outer ``jax.jit``). Finiteness needs the values: the jitted computations
return a flag beside their result (no extra dispatch): ``finite_flag`` of small inputs, or, for
a database, whether every similarity was finite (``topk.block_topk``: a NaN or inf in a row
makes all its similarities non-finite, so this reads ``Q x N`` scores already in hand instead of
``N x D`` values). ``raise_if_not_finite`` turns a False flag into the error naming the argument
and its first bad rows (the host pass runs only then). Under an outer ``jit`` the flag is a
tracer and only the shapes are checked (call ``check_finite`` on the concrete inputs first).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jretrieval.mesh import Sharded, to_host

__all__ = [
    "check_alpha",
    "check_descriptors",
    "check_finite",
    "check_k",
    "check_pair",
    "check_positive",
    "check_shape",
    "finite_flag",
    "raise_if_not_finite",
]


def _shape(x: Any) -> tuple[int, ...]:
    if isinstance(x, Sharded):
        return (x.n, *x.array.shape[1:])
    return tuple(np.shape(x))


def check_shape(x: ArrayLike | Sharded, name: str) -> tuple[int, int]:
    """Raises ``ValueError`` unless ``x`` is a non-empty ``[N, D]`` float array; returns its
    shape. Cheap (no values read), so it also runs on tracers."""
    shape = _shape(x)
    if len(shape) != 2:
        raise ValueError(f"{name} must be a [N, D] descriptor matrix, got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty: got shape {shape}, expected at least one row")
    if shape[1] == 0:
        raise ValueError(f"{name} has zero-dimensional descriptors: got shape {shape}")
    arr = x.array if isinstance(x, Sharded) else x
    dtype = getattr(arr, "dtype", None)
    dtype = np.result_type(arr) if dtype is None else dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array, got dtype {dtype} with shape {shape}")
    return shape


def check_pair(queries: Any, database: Any) -> tuple[int, int, int]:
    """Shape checks of a query/database pair; returns ``(Q, N, D)``."""
    qs = check_shape(queries, "queries")
    ds = check_shape(database, "database")
    if qs[1] != ds[1]:
        raise ValueError(
            f"queries and database have different descriptor sizes: queries {tuple(qs)}, "
            f"database {tuple(ds)} (expected [Q, D] and [N, D] with the same D)"
        )
    return qs[0], ds[0], ds[1]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)


def check_k(k: Any, limit: int, what: str) -> int:
    """``k`` as a Python int (NumPy integers accepted); ``ValueError`` unless ``0 <= k <= limit``.

    ``what`` says where the limit comes from (e.g. ``"database (5, 4) has N = 5 rows"``).
    """
    if not _is_int(k) or not 0 <= int(k) <= limit:
        raise ValueError(f"k={k!r} is out of range: expected an int 0 <= k <= {limit} ({what})")
    return int(k)


def check_positive(**named: Any) -> None:
    """``ValueError`` naming the first argument that is neither ``None`` nor a positive int."""
    for name, v in named.items():
        if v is not None and (not _is_int(v) or int(v) < 1):
            raise ValueError(f"{name} must be a positive int (or None for the default), got {v!r}")


def check_alpha(alpha: Any) -> None:
    """``ValueError`` unless the expansion weight exponent is ``>= 0`` (skipped for tracers)."""
    if not isinstance(alpha, jax.core.Tracer) and not float(alpha) >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")


def check_descriptors(x: ArrayLike | Sharded, name: str) -> None:
    """Raises ``ValueError`` unless ``x`` is a non-empty ``[N, D]`` float array of finite values.

    The finiteness check runs only on concrete arrays (not inside ``jax.jit``).
    """
    check_shape(x, name)
    check_finite(x, name)


def check_finite(x: ArrayLike | Sharded, name: str) -> None:
    """Raises ``ValueError`` naming ``name`` if the concrete array ``x`` holds NaN or inf.

    A no-op for tracers (inside ``jax.jit`` the values are unknown).
    """
    if isinstance(x, jax.core.Tracer):
        return
    if isinstance(x, Sharded):
        if bool(_all_finite(x.array)):  # padding rows are zeros
            return
        x = x.to_numpy()
    elif isinstance(x, jax.Array):
        if bool(_all_finite(x)):
            return
        x = to_host(x)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.inexact) or np.isfinite(x).all():
        return
    bad = ~np.isfinite(x)
    rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1)) if bad.ndim else []
    raise ValueError(
        f"{name} holds NaN or inf (shape {x.shape}, {int(bad.sum())} bad values, first bad "
        f"rows {[int(r) for r in rows[:5]]}); descriptors must be finite"
    )


def finite_flag(*arrays: jax.Array) -> jax.Array:
    """Scalar bool: all of ``arrays`` are finite. Meant inside a jitted computation, so the
    check costs no extra dispatch and runs alongside the main work; see ``raise_if_not_finite``.
    """
    flags = [jnp.all(jnp.isfinite(a)) for a in arrays]
    return functools.reduce(jnp.logical_and, flags, jnp.array(True))


def raise_if_not_finite(flag: jax.Array, **named: Any) -> None:
    """After a jitted call that returned ``finite_flag(...)`` of the ``named`` inputs: raise
    ``ValueError`` naming the first non-finite input (``check_finite``) if the flag is False.

    A no-op when ``flag`` is a tracer (the caller is itself being traced).
    """
    if isinstance(flag, jax.core.Tracer) or bool(flag):
        return
    for name, x in named.items():
        check_finite(x, name)
    # The flag comes from the similarities: finite inputs whose products overflow float32.
    raise ValueError(
        f"the similarities of {' and '.join(named)} are not finite although the inputs are: "
        "values too large for float32 products (descriptors are expected L2-normalised)"
    )


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))
