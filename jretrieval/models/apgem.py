"""AP-GeM (Revaud et al., ICCV 2019; naver dirtorch ``resnet101_rmac``) in Flax Linen.

Shape convention: NHWC float32 images ``[B, H, W, 3]`` (ImageNet mean/std normalised, full
resolution in dirtorch), ``layer4`` map ``[B, h, w, 2048]``, descriptors ``[B, D]`` rows.

The network is a torchvision-layout ResNet (shared with ``resnet.py``: the same flat names
``conv1``, ``layer3_17/conv2``...), then GeM with a learned scalar ``p`` (``adpool/p``, shape
``[1]``), a 2048x2048 ``fc`` with bias and L2 normalisation; that unit vector is the model's own
descriptor (``stages["descriptor"]``). dirtorch's published numbers then apply the PCA shipped in
the checkpoint (``x <- (x - mean) @ components.T / explained_variance ** power``, L2; power 0.25 in
``test_dir.py``). When ``pca_dim > 0`` that PCA is a variable collection ``"pca"`` of the module
(``mean [D]``, ``components [pca_dim, D]``, ``explained_variance [pca_dim]``), stored in the
converted file like any other weights; :func:`apply_pca` applies it.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jretrieval.models.resnet import ResNet


def gem(x: jax.Array, p: jax.Array, eps: float = 1e-6) -> jax.Array:
    """dirtorch GeM: ``mean(clamp(x, eps) ** p) ** (1 / p)`` over H, W; ``[B,H,W,C] -> [B,C]``."""
    return jnp.mean(jnp.maximum(x, eps) ** p, axis=(1, 2)) ** (1.0 / p)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows divided by ``max(||row||, eps)`` (``torch.nn.functional.normalize``); ``[B,D]``."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def apply_pca(
    pca: dict[str, ArrayLike], x: ArrayLike, *, power: float = 0.25, whiten: bool = True
) -> jax.Array:
    """dirtorch's whitening with the checkpoint's PCA, then L2; ``[N, D] -> [N, pca_dim]``.

    Args:
      pca: ``{"mean": [D], "components": [K, D], "explained_variance": [K]}`` (the ``"pca"``
        collection of an AP-GeM encoder's variables).
      x: descriptors ``[N, D]``.
      power: ``whitenp``; divides by ``explained_variance ** power`` (0.25 in ``test_dir.py``).
      whiten: the sklearn object's ``whiten`` flag (``architecture["pca_whiten"]``).
    """
    x = jnp.asarray(x, jnp.float32)
    mean = jnp.asarray(pca["mean"])
    if x.ndim != 2 or x.shape[1] != mean.shape[0]:
        raise ValueError(f"apply_pca: x has shape {x.shape}; expected [N, {mean.shape[0]}]")
    y = (x - mean) @ jnp.asarray(pca["components"]).T
    if whiten:
        y = y / jnp.asarray(pca["explained_variance"]) ** power
    return l2_normalize(y)


class GeM(nn.Module):
    """GeM pooling with a learned scalar exponent ``p`` (shape ``[1]``, initialised to 3)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.param("p", nn.initializers.constant(3.0), (1,), jnp.float32)
        return gem(x.astype(jnp.float32), p[0])


class APGeM(ResNet):
    """ResNet trunk + GeM(p) + ``fc`` (``out_dim``) + L2, plus the checkpoint's PCA as data.

    Attributes (besides ResNet's ``depth``, ``width``, ``bn_momentum``, ``dtype``):
      out_dim: width of ``fc`` (2048 in the released models).
      pca_dim: number of PCA components stored in the ``"pca"`` collection (0: none).
      pca_whiten: the sklearn PCA's ``whiten`` flag, read by :func:`apply_pca` callers.
    """

    has_descriptor: ClassVar[bool] = True

    depth: int = 101
    out_dim: int = 2048
    pca_dim: int = 0
    pca_whiten: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns the ``layer4`` map ``[B,h,w,2048]`` and the stages plus
        ``"descriptor"`` ``[B, out_dim]`` (unit rows, before the PCA)."""
        fmap, stages = self.backbone(x, train)
        pooled = GeM(name="adpool")(fmap)
        desc = nn.Dense(self.out_dim, name="fc")(pooled)
        stages = {**stages, "pooled": pooled, "descriptor": l2_normalize(desc)}
        if self.pca_dim and (self.is_initializing() or self.has_variable("pca", "mean")):
            self.variable("pca", "mean", jnp.zeros, (self.out_dim,), jnp.float32)
            self.variable("pca", "components", jnp.zeros, (self.pca_dim, self.out_dim))
            self.variable("pca", "explained_variance", jnp.ones, (self.pca_dim,), jnp.float32)
        return fmap, stages


APGeM101 = functools.partial(APGeM, depth=101)
APGeM50 = functools.partial(APGeM, depth=50)
