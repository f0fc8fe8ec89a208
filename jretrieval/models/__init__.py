"""The encoders: build by name, random init, load/save converted weights.

Shape convention: every module maps an NHWC float32 batch ``[B, H, W, 3]`` (already normalised
with the encoder's ``preprocessing``) to ``(map [B, h, w, C], {stage name: array})``.

``architecture`` is a JSON-serialisable dict ``{"name": <key of ARCHITECTURES>, **kwargs}``,
e.g. ``{"name": "resnet", "depth": 50, "width": 4}`` (SimCLR 4x) or
``{"name": "apgem", "depth": 101, "pca_dim": 2048}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jretrieval.models import io
from jretrieval.models.amdim import AMDIMEncoder
from jretrieval.models.apgem import APGeM
from jretrieval.models.encoder import COMPUTE_DTYPES, IDENTITY, IMAGENET, Encoder
from jretrieval.models.resnet import ResNet

__all__ = [
    "ARCHITECTURES",
    "COMPUTE_DTYPES",
    "IDENTITY",
    "IMAGENET",
    "Encoder",
    "build",
    "check_variables",
    "init_encoder",
    "load",
    "save",
]

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "resnet": ResNet,
    "apgem": APGeM,
    "amdim": AMDIMEncoder,
}

#: side of the dummy image used to trace ``init`` (AMDIM needs at least 127 px).
INIT_SIZE = 128

save = io.save


def build(architecture: Mapping[str, Any]) -> nn.Module:
    """The Flax module described by ``{"name": ..., **constructor kwargs}``."""
    if "name" not in architecture:
        raise ValueError(f"architecture {dict(architecture)} has no 'name'")
    kwargs = dict(architecture)
    name = kwargs.pop("name")
    if name not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture name {name!r}; expected one of {list(ARCHITECTURES)}"
        )
    cls = ARCHITECTURES[name]
    try:
        return cls(**kwargs)
    except TypeError as err:
        fields = [f for f in cls.__dataclass_fields__ if f not in ("parent", "name")]
        raise ValueError(
            f"architecture {dict(architecture)}: {err}; {name!r} accepts {fields}"
        ) from err


def _abstract_variables(module: nn.Module) -> dict[str, Any]:
    x = jax.ShapeDtypeStruct((1, INIT_SIZE, INIT_SIZE, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), x)


def check_variables(
    architecture: Mapping[str, Any], variables: Mapping[str, Any], *, where: str
) -> None:
    """Raises ``ValueError`` listing every missing, unexpected and mis-shaped variable.

    ``variables`` is compared with ``jax.eval_shape`` of the module's ``init``; ``where`` names
    the file (or checkpoint) in the message.
    """
    expected = io.flatten(_abstract_variables(build(architecture)))
    got = io.flatten(variables)
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = [
        f"{key}: got {tuple(np.shape(got[key]))}, expected {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(got))
        if tuple(np.shape(got[key])) != tuple(expected[key].shape)
    ]
    if missing or unexpected or misshaped:
        parts = [f"{where}: variables do not match architecture {dict(architecture)}"]
        if missing:
            parts.append(f"{len(missing)} missing: {missing}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {unexpected}")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped: {misshaped}")
        raise ValueError("\n".join(parts))


def init_encoder(
    architecture: Mapping[str, Any],
    *,
    seed: int = 0,
    preprocessing: Mapping[str, Any] | None = None,
) -> Encoder:
    """A randomly initialised encoder (Flax default inits); ImageNet preprocessing by default."""
    module = build(architecture)
    x = jnp.zeros((1, INIT_SIZE, INIT_SIZE, 3), jnp.float32)
    variables = jax.jit(module.init)(jax.random.key(seed), x)
    return Encoder(
        module=module,
        variables=dict(variables),
        architecture=dict(architecture),
        preprocessing=dict(preprocessing or IMAGENET),
        metadata={"source": "random init", "seed": seed},
    )


def load(path: str | os.PathLike) -> Encoder:
    """Reads a converted encoder file (see ``jretrieval.models.io``) and validates its shapes."""
    architecture, variables, preprocessing, metadata = io.read(path)
    check_variables(architecture, variables, where=os.fspath(path))
    return Encoder(
        module=build(architecture),
        variables=jax.tree.map(jnp.asarray, variables),
        architecture=architecture,
        preprocessing=preprocessing,
        metadata=metadata,
    )
