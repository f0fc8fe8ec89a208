"""XLA options for the jitted extraction and recalibration steps on a CPU backend.

jax 0.10's XLA CPU lowers convolutions to YNNPACK by default; its Eigen convolutions are about
25% faster for ResNet-50 at 724 px on AVX-512 (``docs/bench_extract.md``). Other backends compile
with their defaults. JAX accepts compiler options only on a top-level ``jax.jit``, so each step is
jitted three times (``jit_pair``): with the options for concrete calls on CPU (one set for lax
convolutions, one for convolutions written as im2col + dot, the bfloat16 path of
``jretrieval.models.convdot``), without them for other backends and for calls under a trace
(``jax.eval_shape``, a caller's ``jax.jit``); ``pick`` chooses the member for an argument.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

__all__ = [
    "CPU_COMPILER_OPTIONS",
    "CPU_CONV_DOT_OPTIONS",
    "Jitted",
    "cpu_tuned",
    "jit_pair",
    "pick",
]

#: XLA options of the jitted steps when the backend is CPU (see the module docstring): Eigen
#: convolutions for modules with ``lax`` convolutions (float32).
CPU_COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": ""}
#: the options for modules whose convolutions are im2col + dot (``conv_dot``, bfloat16 on CPU):
#: YNNPACK's individual dots are XLA CPU's only path to the bfloat16 dot instructions (126
#: GFLOP/s against 57-64 for the default dot; ``docs/bench_extract.md``).
CPU_CONV_DOT_OPTIONS: dict[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


class Jitted(NamedTuple):
    """One function jitted three ways (``jit_pair``); ``pick`` chooses the member."""

    convolutions: Callable  # CPU, CPU_COMPILER_OPTIONS
    conv_dots: Callable  # CPU, CPU_CONV_DOT_OPTIONS
    plain: Callable  # other backends, and calls under a trace


@functools.cache
def cpu_tuned() -> bool:
    """Whether the default backend is CPU and its XLA accepts both option sets."""
    if jax.default_backend() != "cpu":
        return False
    for options in (CPU_COMPILER_OPTIONS, CPU_CONV_DOT_OPTIONS):
        try:
            probe = jax.jit(lambda x: x + 1, compiler_options=options)
            probe.lower(np.zeros(1, np.float32)).compile()
        except jax.errors.JaxRuntimeError as err:  # an XLA without these options: its defaults
            logging.warning("XLA CPU rejects %s (%s); default options", options, err)
            return False
    return True


def jit_pair(fun: Callable, static_argnames: tuple[str, ...]) -> Jitted:
    """``fun`` jitted with each CPU option set and without (see the module docstring)."""

    def jit(options: dict[str, Any] | None) -> Callable:
        return jax.jit(fun, static_argnames=static_argnames, compiler_options=options)

    return Jitted(jit(CPU_COMPILER_OPTIONS), jit(CPU_CONV_DOT_OPTIONS), jit(None))


def pick(jitted: Jitted, x: Any, module: Any = None) -> Callable:
    """The member of ``jitted`` to call on ``x`` with ``module`` (its ``conv_dot`` field)."""
    if not cpu_tuned() or isinstance(x, jax.core.Tracer):
        return jitted.plain
    return jitted.conv_dots if getattr(module, "conv_dot", False) else jitted.convolutions
