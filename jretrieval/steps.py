"""The extraction step: ``uint8 [B, H, W, 3]`` images -> ``float32 [B, D]`` descriptors, jitted.

Shape convention: image batches are ``uint8 [B, H, W, 3]`` RGB as decoded by
``jretrieval.datasets.images``; they are normalised on the device (``normalise``: ``/255``, minus
the encoder's ``preprocessing["mean"]``, divided by ``std``) inside the jitted step; feature maps
are ``[B, h, w, C]``; descriptors ``[B, D]`` float32.

A step is normalisation, the encoder in inference mode, an optional resize of the map to
``Pooling.map_size`` and the pooling, in one jitted call cached across calls (compiled with
``xla_cpu.CPU_COMPILER_OPTIONS`` on CPU). ``make_step(encoder, pooling, mesh=mesh)`` is the same
function data-parallel over a device mesh: the variables are replicated once, each batch is
sharded along ``B`` (``jretrieval.mesh.shard_batch``) and ``jax.jit`` partitions the step along
the batch (GSPMD). Batches are padded to ``padded_batch_size`` (a multiple of the device count)
so every image shape compiles at most ``1 + log2(batch_size)`` times.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.typing import ArrayLike

from jretrieval import mesh as mesh_lib
from jretrieval import xla_cpu
from jretrieval.datasets import images as images_lib
from jretrieval.pooling import POOLING

__all__ = [
    "MODEL_POOLING",
    "Loading",
    "Pooling",
    "as_images",
    "make_step",
    "mean_std",
    "normalise",
    "padded_batch_size",
]

#: ``Pooling.name`` of the encoder's own global descriptor (AP-GeM's head).
MODEL_POOLING = "model"


class Pooling(NamedTuple):
    """How a feature map becomes a descriptor (hashable: it is a static argument).

    Attributes:
      name: a key of ``jretrieval.pooling.POOLING`` or ``"model"`` (the encoder's own
        ``global_descriptor``).
      kwargs: the pooling's keyword arguments as sorted ``(name, value)`` pairs
        (``Pooling.of`` takes a dict).
      map_size: ``(h, w)`` to resize the map to before pooling, or ``None``: with
        ``jax.image.resize(method=map_method, antialias=True)`` (for downsampling a triangle filter
        widened by the scale factor, i.e. Pillow-style antialiased bilinear with half-pixel
        centres; AMDIM's 40x40 -> 23x23 in the paper).
      map_method: the ``jax.image.resize`` method.
    """

    name: str = "rmac"
    kwargs: tuple[tuple[str, Any], ...] = ()
    map_size: tuple[int, int] | None = None
    map_method: str = "linear"

    @classmethod
    def of(
        cls,
        name: str = "rmac",
        kwargs: Mapping[str, Any] | None = None,
        map_size: Any = None,
        map_method: str = "linear",
    ) -> Pooling:
        """A checked ``Pooling`` from a kwargs dict and any ``(h, w)`` sequence."""
        if map_size is not None:
            if len(map_size) != 2 or min(int(s) for s in map_size) < 1:
                raise ValueError(f"map_size={map_size!r}; expected (h, w) positive")
            map_size = (int(map_size[0]), int(map_size[1]))
        if name != MODEL_POOLING and name not in POOLING:
            raise ValueError(f"unknown pooling {name!r}; expected one of {[*POOLING, 'model']}")
        if name == MODEL_POOLING and map_size is not None:
            raise ValueError("map_size applies to pooled maps, not to pooling='model'")
        return cls(str(name), tuple(sorted(dict(kwargs or {}).items())), map_size, map_method)

    def to_dict(self) -> dict[str, Any]:
        """The settings as stored in a descriptor store's key."""
        return {
            "pooling": self.name,
            "pooling_kwargs": dict(self.kwargs),
            "map_size": None if self.map_size is None else list(self.map_size),
            "map_method": self.map_method if self.map_size is not None else None,
        }


class Loading(NamedTuple):
    """How images are decoded and batched before they reach a step (extraction, recalibration).

    Attributes:
      policy: ``images.ResizePolicy`` (``Loading.of`` also takes ``{"mode", "size"}``).
      batch_size: images per device step.
      skip_corrupt: skip unreadable images (reported) instead of raising ``CorruptImageError``.
      num_threads, prefetch: decoding threads and batches decoded ahead.
      loader: replacement for ``images.load_image`` (tests, other storage), or ``None``.
    """

    policy: images_lib.ResizePolicy = images_lib.ResizePolicy()
    batch_size: int = 16
    skip_corrupt: bool = False
    num_threads: int | None = None
    prefetch: int = 2
    loader: Callable[..., np.ndarray] | None = None

    @classmethod
    def of(cls, policy: Any = None, **kwargs: Any) -> Loading:
        """A checked ``Loading`` (``policy`` may be a dict; ``None``: the default policy)."""
        policy = images_lib.ResizePolicy() if policy is None else images_lib.as_policy(policy)
        loading = cls(policy, **kwargs)
        if int(loading.batch_size) != loading.batch_size or loading.batch_size < 1:
            raise ValueError(f"batch_size={loading.batch_size!r}; expected a positive integer")
        return loading

    def iterate(self, paths: Any, *, bbx: Any = None, plan: Any = None) -> Any:
        """``images.iterate_batches`` of ``paths`` with these settings."""
        return images_lib.iterate_batches(
            paths,
            bbx=bbx,
            policy=self.policy,
            batch_size=self.batch_size,
            plan=plan,
            num_threads=self.num_threads,
            prefetch=self.prefetch,
            skip_corrupt=self.skip_corrupt,
            loader=self.loader,
        )


def normalise(images: ArrayLike, mean: ArrayLike, std: ArrayLike) -> jax.Array:
    """``uint8 [B, H, W, 3]`` -> float32 ``(images / 255 - mean) / std``; mean, std ``[3]``."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def mean_std(encoder: Any) -> tuple[jax.Array, jax.Array]:
    """The encoder's ``preprocessing`` mean and std, checked to be ``[3]`` each."""
    pre = getattr(encoder, "preprocessing", None) or {}
    if "mean" not in pre or "std" not in pre:
        raise ValueError(f"encoder.preprocessing={pre!r}; expected {{'mean': [3], 'std': [3]}}")
    mean, std = jnp.asarray(pre["mean"], jnp.float32), jnp.asarray(pre["std"], jnp.float32)
    if mean.shape != (3,) or std.shape != (3,):
        raise ValueError(f"preprocessing mean/std have shapes {mean.shape}/{std.shape}; want (3,)")
    return mean, std


def as_images(batch: Any) -> Any:
    """The ``uint8 [B, H, W, 3]`` images of an ``images.Batch`` or an array (checked)."""
    images = getattr(batch, "images", batch)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"batch images have shape {images.shape} dtype {images.dtype}; "
            "expected uint8 [B, H, W, 3] RGB (a jretrieval.datasets.images.Batch or an array)"
        )
    return images


def padded_batch_size(b: int, batch_size: int, multiple: int = 1) -> int:
    """``batch_size`` for full batches, else the next power of two (at most ``batch_size``),
    rounded up to a multiple of ``multiple`` (the device count of a sharded step)."""
    size = batch_size if b >= batch_size else min(batch_size, 1 << max(b - 1, 0).bit_length())
    return -(-size // multiple) * multiple


def _describe_fn(
    module: nn.Module,
    variables: Any,
    images: jax.Array,
    mean: jax.Array,
    std: jax.Array,
    *,
    pooling: Pooling,
) -> jax.Array:
    x = normalise(images, mean, std)
    fmap, stages = module.apply(variables, x, train=False)
    if pooling.name == MODEL_POOLING:
        return stages["descriptor"].astype(jnp.float32)
    fmap = fmap.astype(jnp.float32)
    if pooling.map_size is not None and tuple(fmap.shape[1:3]) != pooling.map_size:
        b, _, _, c = fmap.shape
        shape = (b, *pooling.map_size, c)
        fmap = jax.image.resize(fmap, shape, method=pooling.map_method, antialias=True)
    return POOLING[pooling.name](fmap, **dict(pooling.kwargs)).astype(jnp.float32)


_describe = xla_cpu.jit_pair(_describe_fn, ("module", "pooling"))


def make_step(
    encoder: Any, pooling: Pooling | str = "rmac", *, mesh: Mesh | None = None
) -> Callable[[ArrayLike], jax.Array]:
    """The extraction step ``uint8 [B, H, W, 3] -> float32 [B, D]`` of ``encoder``.

    Args:
      encoder: a ``jretrieval.models.Encoder``.
      pooling: a ``Pooling`` (or a pooling name with default arguments).
      mesh: ``None`` (the default device) or a mesh of this process's devices
        (``mesh.local_mesh``): data parallel, ``B`` a multiple of the mesh size.
    """
    pooling = Pooling.of(pooling) if isinstance(pooling, str) else Pooling.of(*pooling)
    if pooling.name == MODEL_POOLING and not getattr(encoder.module, "has_descriptor", False):
        raise ValueError(
            f"pooling='model' but {type(encoder.module).__name__} has no global descriptor"
        )
    mean, std = mean_std(encoder)
    module, variables = encoder.module, encoder.step_variables()
    sharded = mesh is not None and not (mesh_lib.mesh_size(mesh) == 1 and mesh_lib.is_local(mesh))
    if sharded:
        variables = mesh_lib.replicate(variables, mesh)

    def step(images: ArrayLike) -> jax.Array:
        if sharded and not isinstance(images, jax.core.Tracer):  # eval_shape traces unplaced
            images = mesh_lib.shard_batch(np.asarray(images), mesh)
        fn = xla_cpu.pick(_describe, images, module)
        return fn(module, variables, images, mean, std, pooling=pooling)

    return step
