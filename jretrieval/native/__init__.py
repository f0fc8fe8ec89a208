"""Native CPU kernels: C++ XLA FFI custom calls, compiled on first use.

One kernel: ``truncated_cg``, the per-node truncated CG solves of ``jretrieval.diffusion``
(source: ``truncated_cg.cc`` beside this file). On CPU those solves are bound by XLA's gathers
over padded ``[T, kd]`` neighbour tables; the C++ kernel stores only the edges inside each
truncation set that the node reaches and is several times faster (``docs/bench_diffusion.md``).
It is an XLA custom call, so it runs inside ``jit``/``shard_map`` like any other op; on GPU/TPU
the XLA kernels are used (the results agree to float rounding).

The library is built with the system C++ compiler (``$CXX``, else ``c++``, ``g++`` or
``clang++``) against the XLA FFI headers that ship with jaxlib, and cached in
``$JRETRIEVAL_CACHE`` (default ``~/.cache/jretrieval``) under a name keyed by the source, the
jaxlib version and the flags, so a new jaxlib or an edited source builds afresh. Without a
compiler ``available()`` is False (with the reason logged once) and callers fall back to XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

__all__ = ["available", "require", "threads", "truncated_cg"]

_SOURCE = Path(__file__).with_name("truncated_cg.cc")
_TARGET = "jretrieval_truncated_cg"
# Portable flags (no -march=native: a cache directory may be shared by different machines).
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fopenmp-simd", "-w")


def _cache_dir() -> Path:
    return Path(os.environ.get("JRETRIEVAL_CACHE") or Path.home() / ".cache" / "jretrieval")


def _compiler() -> str | None:
    return os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None
    )


@functools.cache
def _build() -> tuple[Path | None, str | None]:
    """Builds (or finds) the library: ``(path, None)``, or ``(None, why it failed)``."""
    if sys.platform != "linux":
        return None, f"native kernels are built on Linux only (this is {sys.platform})"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found (set $CXX, or install g++)"
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + jaxlib.__version__.encode() + " ".join(_FLAGS).encode())
    lib = _cache_dir() / f"truncated_cg-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib, None
    # Built under a temporary name and renamed: processes building at once never load a
    # half-written library.
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    except OSError as e:
        return None, f"cannot write the library to {lib.parent} (set $JRETRIEVAL_CACHE): {e}"
    os.close(fd)
    cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.unlink(tmp)
        return None, f"compiling {_SOURCE.name} failed: {' '.join(cmd)}: {e}"
    if run.returncode != 0:
        os.unlink(tmp)
        tail = "\n".join(run.stderr.strip().splitlines()[-10:])
        return None, f"compiling {_SOURCE.name} failed: {' '.join(cmd)}\n{tail}"
    os.replace(tmp, lib)
    logging.info("native: built %s", lib)
    return lib, None


_registered: list[
    Path
] = []  # the library whose kernel XLA knows (registration is once per process)


@functools.cache
def _failure() -> str | None:
    """None once the kernel is registered, else why not (logged once)."""
    lib, why = _build()
    if why is None and not _registered:
        try:
            handle = ctypes.cdll.LoadLibrary(str(lib))
            capsule = jax.ffi.pycapsule(handle.TruncatedCg)
            jax.ffi.register_ffi_target(_TARGET, capsule, platform="cpu")
            _registered.append(lib)
        except (OSError, AttributeError) as e:
            why = f"loading {lib} failed: {e} (delete it to rebuild)"
    if why is not None:
        logging.warning("native kernels unavailable, using the XLA kernels instead: %s", why)
    return why


def available() -> bool:
    """Whether the native kernels are built and registered (builds them on the first call)."""
    return _failure() is None


def require() -> None:
    """Builds the native kernels or raises ``RuntimeError`` saying why they cannot be built."""
    why = _failure()
    if why is not None:
        raise RuntimeError(f"the native diffusion solver is unavailable: {why}")


def threads(devices: int = 1) -> int:
    """Worker threads per call: the cores this process may use, shared by ``devices``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, devices))


def truncated_cg(
    t_ids: jax.Array,
    ids_kd: jax.Array,
    a_s: jax.Array,
    *,
    max_iter: int,
    tol: float,
    num_threads: int | None = None,
) -> jax.Array:
    """Per-node truncated CG solves on CPU; traceable. Raises ``RuntimeError`` (``require``)
    if the kernel cannot be built.

    Args:
      t_ids: int32 ``[C, T]`` truncation sets, each node first in its own row.
      ids_kd: int32 ``[M, kd]`` kd-lists of all nodes.
      a_s: float32 ``[M, kd]`` ``alpha S`` on the kd-lists (0 for non-mutual slots).
      max_iter, tol: CG cap and relative tolerance (as ``diffusion.offline``).
      num_threads: worker threads (default: ``threads()``).

    Returns:
      float32 ``[C, T]``: row ``c`` solves ``(I - alpha S)_TT x = e_0`` on ``t_ids[c]``.
    """
    require()
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(t_ids.shape, jnp.float32))
    return call(
        t_ids.astype(jnp.int32),
        ids_kd.astype(jnp.int32),
        a_s.astype(jnp.float32),
        max_iter=np.int32(max_iter),
        tol=np.float32(tol),
        threads=np.int32(threads() if num_threads is None else num_threads),
    )
