"""XLA options for the jitted extraction and recalibration steps on a CPU backend.

jax 0.10's XLA CPU lowers convolutions to YNNPACK by default; its Eigen convolutions are about
25% faster for ResNet-50 at 724 px on AVX-512 (``docs/bench_extract.md``). Other backends compile
with their defaults. JAX accepts compiler options only on a top-level ``jax.jit``, so each step is
jitted twice (``jit_pair``): with the options for concrete calls on CPU, without them for other
backends and for calls under a trace (``jax.eval_shape``, a caller's ``jax.jit``); ``pick``
chooses the member for an argument.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging

__all__ = ["CPU_COMPILER_OPTIONS", "cpu_tuned", "jit_pair", "pick"]

#: XLA options of the jitted steps when the backend is CPU (see the module docstring).
CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def cpu_tuned() -> bool:
    """Whether the default backend is CPU and its XLA accepts ``CPU_COMPILER_OPTIONS``."""
    if jax.default_backend() != "cpu":
        return False
    try:
        probe = jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS)
        probe.lower(np.zeros(1, np.float32)).compile()
    except jax.errors.JaxRuntimeError as err:  # an XLA without these options: its defaults
        logging.warning("XLA CPU rejects %s (%s); default options", CPU_COMPILER_OPTIONS, err)
        return False
    return True


def jit_pair(fun: Callable, static_argnames: tuple[str, ...]) -> tuple[Callable, Callable]:
    """``fun`` jitted with ``CPU_COMPILER_OPTIONS`` and without (see the module docstring)."""
    cpu = jax.jit(fun, static_argnames=static_argnames, compiler_options=CPU_COMPILER_OPTIONS)
    return cpu, jax.jit(fun, static_argnames=static_argnames)


def pick(pair: tuple[Callable, Callable], x: Any) -> Callable:
    """The member of a ``jit_pair`` to call on ``x``."""
    return pair[0] if cpu_tuned() and not isinstance(x, jax.core.Tracer) else pair[1]
