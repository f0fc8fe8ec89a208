"""Native CPU kernels: C++ XLA FFI custom calls, compiled on first use.

Two kernels (``KERNELS``), each a source beside this file:

- ``truncated_cg``: the per-node truncated CG solves of ``jretrieval.diffusion``. On CPU those
  solves are bound by XLA's gathers over padded ``[T, kd]`` neighbour tables; the C++ kernel
  stores only the edges inside each truncation set that the node reaches and is several times
  faster (``docs/bench_diffusion.md``).
- ``conv_bf16``: bfloat16 convolutions on processors with AVX512-BF16, for
  ``jretrieval.models.convdot``. XLA's CPU backend converts bfloat16 convolutions to float32,
  and its one bfloat16 matrix path (YNNPACK dots) needs the patches written out (im2col); this
  kernel reads them in place and multiplies with ``vdpbf16ps`` (``docs/bench_extract.md``).

Each is an XLA custom call, so it runs inside ``jit``/``shard_map`` like any other op; on GPU/TPU
(and on CPUs the kernel cannot run on) the XLA kernels are used (the results agree to float
rounding).

The library is built with the system C++ compiler (``$CXX``, else ``c++``, ``g++`` or
``clang++``) against the XLA FFI headers that ship with jaxlib, and cached in
``$JRETRIEVAL_CACHE`` (default ``~/.cache/jretrieval``) under a name keyed by the source, the
jaxlib version and the flags, so a new jaxlib or an edited source builds afresh. Without a
compiler (or the instruction set) ``available(name)`` is False (with the reason logged once)
and callers fall back to XLA.
"""

from __future__ import annotations

import ctypes
import dataclasses
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

__all__ = ["available", "conv_bf16", "require", "threads", "truncated_cg"]

# Portable flags (no -march=native: a cache directory may be shared by different machines);
# a kernel for one instruction set adds its own flags and runs only where /proc/cpuinfo lists them.
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fopenmp-simd", "-w")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One C++ source beside this module, built into its own library."""

    source: str  # file name
    symbol: str  # the XLA FFI handler it defines
    what: str  # for messages
    flags: tuple[str, ...] = ()  # extra compiler flags
    cpu_flags: tuple[str, ...] = ()  # /proc/cpuinfo flags the processor needs

    @property
    def target(self) -> str:
        return f"jretrieval_{Path(self.source).stem}"


KERNELS = {
    "truncated_cg": Kernel("truncated_cg.cc", "TruncatedCg", "the native diffusion solver"),
    "conv_bf16": Kernel(
        "conv_bf16.cc",
        "ConvBf16",
        "the native bfloat16 convolution",
        flags=("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"),
        cpu_flags=("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
    ),
}


def _cache_dir() -> Path:
    return Path(os.environ.get("JRETRIEVAL_CACHE") or Path.home() / ".cache" / "jretrieval")


def _compiler() -> str | None:
    return os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None
    )


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((x for x in f if x.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


@functools.cache
def _build(name: str = "truncated_cg") -> tuple[Path | None, str | None]:
    """Builds (or finds) kernel ``name``'s library: ``(path, None)``, or ``(None, why not)``."""
    kernel = KERNELS[name]
    if sys.platform != "linux":
        return None, f"native kernels are built on Linux only (this is {sys.platform})"
    missing = [f for f in kernel.cpu_flags if f not in _cpu_flags()]
    if missing:
        return None, f"this processor lacks {', '.join(missing)} (/proc/cpuinfo)"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found (set $CXX, or install g++)"
    source_path = Path(__file__).with_name(kernel.source)
    flags = (*_FLAGS, *kernel.flags)
    key = hashlib.sha256(
        source_path.read_bytes() + jaxlib.__version__.encode() + " ".join(flags).encode()
    )
    lib = _cache_dir() / f"{source_path.stem}-{key.hexdigest()[:16]}.so"
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
    cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", str(source_path), "-o", tmp]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.unlink(tmp)
        return None, f"compiling {kernel.source} failed: {' '.join(cmd)}: {e}"
    if run.returncode != 0:
        os.unlink(tmp)
        tail = "\n".join(run.stderr.strip().splitlines()[-10:])
        return None, f"compiling {kernel.source} failed: {' '.join(cmd)}\n{tail}"
    os.replace(tmp, lib)
    logging.info("native: built %s", lib)
    return lib, None


@functools.cache
def _failure(name: str = "truncated_cg") -> str | None:
    """None once kernel ``name`` is registered with XLA (once per process), else why not
    (logged once)."""
    kernel = KERNELS[name]
    lib, why = _build(name)
    if why is None and name not in _registered:
        try:
            handle = ctypes.cdll.LoadLibrary(str(lib))
            capsule = jax.ffi.pycapsule(getattr(handle, kernel.symbol))
            jax.ffi.register_ffi_target(kernel.target, capsule, platform="cpu")
            _registered[name] = lib
        except (OSError, AttributeError) as e:
            why = f"loading {lib} failed: {e} (delete it to rebuild)"
    if why is not None:
        logging.warning("%s is unavailable, using XLA's kernels instead: %s", kernel.what, why)
    return why


#: kernel name -> the library XLA knows it from (registration is once per process).
_registered: dict[str, Path] = {}


def available(name: str = "truncated_cg") -> bool:
    """Whether kernel ``name`` is built and registered (builds it on the first call)."""
    return _failure(name) is None


def require(name: str = "truncated_cg") -> None:
    """Builds kernel ``name`` or raises ``RuntimeError`` saying why it cannot be built."""
    why = _failure(name)
    if why is not None:
        raise RuntimeError(f"{KERNELS[name].what} is unavailable: {why}")


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
    require("truncated_cg")
    target = KERNELS["truncated_cg"].target
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(t_ids.shape, jnp.float32))
    return call(
        t_ids.astype(jnp.int32),
        ids_kd.astype(jnp.int32),
        a_s.astype(jnp.float32),
        max_iter=np.int32(max_iter),
        tol=np.float32(tol),
        threads=np.int32(threads() if num_threads is None else num_threads),
    )


def conv_bf16(
    x: jax.Array,
    w: jax.Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    *,
    bias: jax.Array | None = None,
    residual: jax.Array | None = None,
    relu: bool = False,
    num_threads: int | None = None,
) -> jax.Array:
    """``act(conv(x, w) + bias + residual)`` in bfloat16 on CPUs with AVX512-BF16: float32 sums
    and epilogue, rounded once to bfloat16 (``conv_bf16.cc``); traceable. Raises
    ``RuntimeError`` (``require``) if the kernel cannot be built or this processor cannot run it.

    Args:
      x: bfloat16 ``[B, H, W, C]``.
      w: bfloat16 ``[kh, kw, C, N]`` (HWIO), ``N`` a multiple of 16.
      strides: ``(sh, sw)``.
      padding: ``((top, bottom), (left, right))`` zeros around ``x``, none negative.
      bias: ``[N]`` added in float32 (default none).
      residual: ``[B, Ho, Wo, N]`` added after the bias (default none).
      relu: ``max(0, .)`` last.
      num_threads: worker threads (default: ``threads()``).

    Returns:
      bfloat16 ``[B, Ho, Wo, N]``, ``Ho = (H + top + bottom - kh) // sh + 1`` (``Wo`` alike).
    """
    require("conv_bf16")
    if (
        x.dtype != jnp.bfloat16
        or w.dtype != jnp.bfloat16
        or x.ndim != 4
        or w.ndim != 4
        or x.shape[3] != w.shape[2]
    ):
        raise ValueError(
            f"conv_bf16: x {x.dtype}{list(x.shape)}, w {w.dtype}{list(w.shape)}; "
            "expected bfloat16 [B, H, W, C] and [kh, kw, C, N]"
        )
    (top, bottom), (left, right) = padding
    kh, kw, c, n = w.shape
    b, h, wd, _ = x.shape
    ho, wo = (h + top + bottom - kh) // strides[0] + 1, (wd + left + right - kw) // strides[1] + 1
    if n % 16 or min(top, bottom, left, right) < 0 or ho < 1 or wo < 1:
        raise ValueError(
            f"conv_bf16: N={n} (a multiple of 16 expected), padding {padding}, output {ho}x{wo}"
        )
    # the kernel reads each kernel row's kw * c values as pairs: an odd count gets a zero row
    rows = w.reshape(kh, kw * c, n)
    if (kw * c) % 2:
        rows = jnp.pad(rows, ((0, 0), (0, 1), (0, 0)))
    out = jax.ShapeDtypeStruct((b, ho, wo, n), jnp.bfloat16)
    bias = jnp.zeros((n,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    if bias.shape != (n,):
        raise ValueError(f"conv_bf16: bias {list(bias.shape)}; expected [{n}]")
    if residual is None:
        residual = jnp.zeros((0,), jnp.bfloat16)  # the kernel reads an empty residual as none
    elif residual.shape != out.shape:
        raise ValueError(f"conv_bf16: residual {list(residual.shape)}; expected {list(out.shape)}")
    call = jax.ffi.ffi_call(KERNELS["conv_bf16"].target, out, vmap_method="sequential")
    return call(
        x,
        rows,
        bias,
        residual.astype(jnp.bfloat16),
        kw=np.int64(kw),
        sh=np.int64(strides[0]),
        sw=np.int64(strides[1]),
        pt=np.int64(top),
        pl=np.int64(left),
        relu=np.int64(bool(relu)),
        threads=np.int64(threads() if num_threads is None else num_threads),
    )
