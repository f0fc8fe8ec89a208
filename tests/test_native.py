"""Tests of jretrieval.native: the C++ truncated-CG kernel, its build, and the XLA fallback.

The kernel is compared with hand-computed CG iterates on a 2-node graph (exact to 1e-6) and
with ``diffusion._solve_nodes`` (the XLA per-node kernel, which solves on the whole truncation
set without the kernel's reach shortcut) to 1e-5 of each row's largest entry. The offline
matrices of every solver against the SciPy reference are in test_diffusion.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jretrieval import diffusion, native

from .test_diffusion import clustered, dense, needs_compiler, ref_offline, two_chains


def _cg(t_ids, ids_kd, a_s, max_iter=20, tol=1e-6, **kw):
    args = (jnp.asarray(t_ids, jnp.int32), jnp.asarray(ids_kd, jnp.int32), jnp.asarray(a_s))
    return np.asarray(native.truncated_cg(*args, max_iter=max_iter, tol=tol, **kw))


@needs_compiler
def test_two_node_system_by_hand():
    # alpha S = [[0, .5], [.5, 0]]: L = [[1, -.5], [-.5, 1]], L^-1 e_0 = [4/3, 2/3].
    ids_kd, a_s = [[0, 1], [1, 0]], np.array([[0.0, 0.5], [0.0, 0.5]], np.float32)
    t_ids = [[0, 1], [1, 0]]  # node 0's and node 1's truncation sets, each node first
    # One CG step from x = 0 with b = p = e_0: x = (b.b / p.Lp) p = e_0 (p.Lp = L_00 = 1).
    np.testing.assert_allclose(_cg(t_ids, ids_kd, a_s, max_iter=1), [[1, 0], [1, 0]], atol=1e-6)
    # Two steps solve a 2x2 system exactly.
    expect = [[4 / 3, 2 / 3], [4 / 3, 2 / 3]]
    np.testing.assert_allclose(_cg(t_ids, ids_kd, a_s, max_iter=2), expect, atol=1e-6)
    # max_iter=0 leaves x = 0; a truncation set of the node alone gives L_00^-1 = 1.
    np.testing.assert_array_equal(_cg(t_ids, ids_kd, a_s, max_iter=0), np.zeros((2, 2)))
    np.testing.assert_allclose(_cg([[0], [1]], ids_kd, a_s), [[1], [1]], atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 3])
def test_matches_the_xla_kernel_and_skips_unreached_nodes(threads):
    # Two chains: each truncation set spans both, but a node reaches only its own chain.
    x = two_chains()
    ids, ids_kd, sims_kd = diffusion._neighbours(x, 30, 4)
    a_s, _ = diffusion._graph(jnp.asarray(ids_kd), jnp.asarray(sims_kd), 3.0, 0.99)
    nodes = jnp.arange(len(x), dtype=jnp.int32)
    ref = np.asarray(diffusion._solve_nodes(nodes, ids, ids_kd, a_s, max_iter=20, tol=1e-6))
    got = _cg(ids, ids_kd, a_s, num_threads=threads)
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())
    chain = np.arange(len(x)) // 20
    other = chain[ids] != chain[:, None]
    assert other.any() and np.all(got[other] == 0)  # exactly zero, as in the XLA kernel


@needs_compiler
def test_runs_inside_jit():
    ids_kd, a_s = jnp.array([[0, 1], [1, 0]]), jnp.array([[0.0, 0.5], [0.0, 0.5]])
    f = jax.jit(lambda t: 2 * native.truncated_cg(t, ids_kd, a_s, max_iter=2, tol=1e-6))
    np.testing.assert_allclose(f(jnp.array([[1, 0]], jnp.int32)), [[8 / 3, 4 / 3]], atol=1e-6)


@needs_compiler
def test_bad_ids_are_refused_with_the_reason():
    ids_kd, a_s = [[0, 1], [1, 0]], np.zeros((2, 2), np.float32)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"node id outside \[0, M\)"):
        _cg([[0, 5]], ids_kd, a_s)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"node id outside \[0, M\)"):
        _cg([[0, 1]], [[0, -1], [1, 0]], a_s)
    with pytest.raises(jax.errors.JaxRuntimeError, match="expected t_ids"):
        _cg([[0, 1]], ids_kd, np.zeros((2, 3), np.float32))


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    """A machine without a C++ compiler and without a built library."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("JRETRIEVAL_CACHE", str(tmp_path / "cache"))
    native._build.cache_clear()
    native._failure.cache_clear()
    yield
    native._build.cache_clear()  # the next use finds the real library again
    native._failure.cache_clear()


def test_without_a_compiler_auto_falls_back_to_xla(no_compiler):
    assert not native.available()
    with pytest.raises(RuntimeError, match="no-such-c\\+\\+"):
        native.require()
    x = clustered(80, dim=16, clusters=2, seed=3)
    with pytest.raises(RuntimeError, match="native diffusion solver is unavailable"):
        diffusion.offline(x, truncation=30, kd=6, solver="native")
    got = dense(diffusion.offline(x, truncation=30, kd=6))  # "auto": the XLA kernels
    ref = ref_offline(x, 30, 6)
    assert np.all(np.abs(got - ref) <= 1e-4 * np.abs(ref).max(axis=1, keepdims=True))
    assert not list((native._cache_dir()).glob("*.so"))  # no half-built library left behind


@needs_compiler
def test_library_is_cached_by_source_and_jaxlib(tmp_path, monkeypatch):
    monkeypatch.setenv("JRETRIEVAL_CACHE", str(tmp_path))
    native._build.cache_clear()
    try:
        lib, why = native._build()
        assert why is None and lib.parent == tmp_path
        built = list(tmp_path.glob("truncated_cg-*.so"))
        assert built == [lib] and not list(tmp_path.glob("tmp*"))
        mtime = lib.stat().st_mtime_ns
        native._build.cache_clear()
        assert native._build() == (lib, None)  # found, not rebuilt
        assert built[0].stat().st_mtime_ns == mtime
    finally:
        native._build.cache_clear()
