"""``Encoder``: a Flax module with its variables, preprocessing and provenance.

Shape convention: ``x`` is an NHWC float32 batch ``[B, H, W, 3]`` already normalised with
``preprocessing`` (RGB in [0, 1], minus ``mean``, divided by ``std``); ``feature_map`` returns the
module's selected last conv map ``[B, h, w, C]``; descriptors are ``[B, D]`` rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jretrieval.models import apgem

#: side of the dummy image used to trace ``init`` (AMDIM needs at least 127 px).
INIT_SIZE = 128

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
IDENTITY = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
#: compute dtypes of ``Encoder.with_dtype``, by the names configs use.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_conv_dot(dtype: str) -> bool:
    """Whether ``with_dtype(dtype)`` computes convolutions with ``convdot`` by default: for
    bfloat16 on a CPU backend, where XLA's convolutions miss the bfloat16 dot units
    (``docs/bench_extract.md``); float32 and other backends keep ``lax`` convolutions."""
    return dtype == "bfloat16" and jax.default_backend() == "cpu"


@functools.partial(jax.jit, static_argnames=("module",))
def _feature_map(module: nn.Module, variables: Any, x: jax.Array) -> jax.Array:
    return module.apply(variables, x, train=False)[0]


@functools.partial(jax.jit, static_argnames=("module",))
def _descriptor(module: nn.Module, variables: Any, x: jax.Array) -> jax.Array:
    return module.apply(variables, x, train=False)[1]["descriptor"]


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
    """A frozen encoder.

    Attributes:
      module: the Flax module (``__call__(x, *, train) -> (map, stages)``).
      variables: ``{"params": ..., "batch_stats": ..., [+ "pca" for AP-GeM]}`` of ``jax.Array``.
      architecture: ``{"name": ..., **kwargs}`` that ``jretrieval.models.build`` understands.
      preprocessing: ``{"mean": [3], "std": [3]}`` applied to RGB in [0, 1].
      metadata: provenance (source file, SHA-256, checkpoint format...).
    """

    module: nn.Module
    variables: dict[str, Any]
    architecture: dict[str, Any]
    preprocessing: dict[str, Any]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def feature_map(self, x: ArrayLike) -> jax.Array:
        """Inference-mode (running BN statistics) map: ``[B, H, W, 3] -> [B, h, w, C]``; jitted."""
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"feature_map: x has shape {x.shape}; expected [B, H, W, 3]")
        return _feature_map(self.module, self.variables, x)

    def global_descriptor(
        self, x: ArrayLike, *, pca_power: float | None = None
    ) -> jax.Array | None:
        """The model's own descriptor ``[B, D]`` (AP-GeM: GeM + fc + L2), or ``None``.

        Args:
          x: ``[B, H, W, 3]`` normalised batch.
          pca_power: if given, also apply the PCA shipped with the checkpoint, dividing by
            ``explained_variance ** pca_power`` (dirtorch's published numbers: 0.25), then L2.
        """
        if not getattr(self.module, "has_descriptor", False):
            return None
        x = jnp.asarray(x, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"global_descriptor: x has shape {x.shape}; expected [B, H, W, 3]")
        if pca_power is not None and "pca" not in self.variables:
            raise ValueError(
                "global_descriptor(pca_power=...): this encoder has no 'pca' variables "
                f"(architecture {self.architecture}); convert the checkpoint with its PCA"
            )
        desc = _descriptor(self.module, self.variables, x)
        if pca_power is None:
            return desc
        whiten = bool(getattr(self.module, "pca_whiten", True))
        return apgem.apply_pca(self.variables["pca"], desc, power=pca_power, whiten=whiten)

    def with_dtype(self, dtype: str, conv_dot: bool | None = None) -> Encoder:
        """A copy whose module computes in ``dtype`` (a key of ``COMPUTE_DTYPES``).

        Only the module's ``dtype`` (and ``conv_dot``) fields change: parameters and BN
        statistics stay float32 (each conv casts its kernel and input to ``dtype``; BatchNorm
        normalises in float32 and returns ``dtype``), so ``feature_map`` returns a ``dtype``
        map, which pooling casts to float32. Recalibrate BN (and fold it) before switching:
        statistics are estimated in float32.

        Args:
          dtype: "float32" or "bfloat16".
          conv_dot: compute convolutions with ``convdot`` (the native AVX512-BF16 kernel where it
            builds, else im2col + dot: XLA's CPU convolutions never reach the bfloat16 matrix
            units); ``None`` picks it for bfloat16 on a CPU backend (``default_conv_dot``).
            Ignored (must be falsy) for modules without the field.
        """
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {list(COMPUTE_DTYPES)}")
        fields = getattr(self.module, "__dataclass_fields__", {})
        if conv_dot is None:
            conv_dot = default_conv_dot(dtype) and "conv_dot" in fields
        if conv_dot and "conv_dot" not in fields:
            raise ValueError(f"{type(self.module).__name__} has no conv_dot field")
        if "dtype" not in fields:
            if dtype == "float32":  # a module without the field computes in float32
                return self
            raise ValueError(f"{type(self.module).__name__} has no dtype field; cannot switch")
        changes = {"dtype": COMPUTE_DTYPES[dtype]}
        if "conv_dot" in fields:
            changes["conv_dot"] = bool(conv_dot)
        if all(getattr(self.module, k) == v for k, v in changes.items()):
            return self
        return self.replace(module=self.module.clone(**changes))

    def step_variables(self) -> dict[str, Any]:
        """``variables`` as the jitted steps take them: every ``kernel`` parameter in the
        module's compute ``dtype`` (each conv and dense layer casts its kernel to it on every
        call; bfloat16 steps cast once here instead, which at 724 px saves a ResNet-50 about
        30 ms per batch on 2 cores), everything else as stored. ``variables`` stay float32, so
        ``with_dtype("float32")`` loses nothing."""
        dtype = getattr(self.module, "dtype", jnp.float32)
        if jnp.dtype(dtype) == jnp.float32 or "params" not in self.variables:
            return self.variables

        def cast(path: tuple[Any, ...], leaf: Any) -> Any:
            if getattr(path[-1], "key", None) == "kernel" and jnp.issubdtype(
                leaf.dtype, jnp.floating
            ):
                return jnp.asarray(leaf, dtype)
            return leaf

        params = jax.tree_util.tree_map_with_path(cast, self.variables["params"])
        return {**self.variables, "params": params}

    def replace(self, **changes: Any) -> Encoder:
        """A copy with some fields replaced (e.g. recalibrated ``variables``)."""
        return dataclasses.replace(self, **changes)
