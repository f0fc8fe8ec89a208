"""The encoders: build by name, random init, load/save converted weights.

Shape convention: every module maps an NHWC float32 batch ``[B, H, W, 3]`` (already normalised
with the encoder's ``preprocessing``) to ``(map [B, h, w, C], {stage name: array})``.

``architecture`` is a JSON-serialisable dict ``{"name": <key of ARCHITECTURES>, **kwargs}``,
e.g. ``{"name": "resnet", "depth": 50, "width": 4}`` (SimCLR 4x) or
``{"name": "apgem", "depth": 101, "pca_dim": 2048}``.

A model zoo entry states the architecture its file must hold (``model_zoo[m].architecture`` in
the configs): ``load(path, expected=...)`` compares it with the file's metadata before reading a
single weight and raises :class:`ArchitectureMismatchError` naming both, so a ResNet-101 saved
as ``baseline.h5`` is refused instead of being reported as the ResNet-50 baseline.
"""

from __future__ import annotations

import dataclasses
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
from jretrieval.models.encoder import COMPUTE_DTYPES, IDENTITY, IMAGENET, INIT_SIZE, Encoder
from jretrieval.models.fold import fold_batch_norm
from jretrieval.models.resnet import ResNet

__all__ = [
    "ARCHITECTURES",
    "ArchitectureMismatchError",
    "COMPUTE_DTYPES",
    "IDENTITY",
    "IMAGENET",
    "Encoder",
    "architecture_name",
    "build",
    "check_architecture",
    "check_variables",
    "fold_batch_norm",
    "init_encoder",
    "load",
    "provenance",
    "read_architecture",
    "save",
]

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "resnet": ResNet,
    "apgem": APGeM,
    "amdim": AMDIMEncoder,
}


save = io.save
read_architecture = io.read_architecture


class ArchitectureMismatchError(ValueError):
    """An encoder file holds another architecture than its zoo entry expects (names both)."""


def architecture_name(architecture: Mapping[str, Any]) -> str:
    """A short human name: ``resnet-50``, ``resnet-50 x4``, ``amdim ndf256``, ``apgem-101``."""
    arch = dict(architecture)
    name = str(arch.get("name", "?"))
    if "depth" in arch:
        name += f"-{arch['depth']}"
    if arch.get("width", 1) != 1:
        name += f" x{arch['width']}"
    if "ndf" in arch:
        name += f" ndf{arch['ndf']} rkhs{arch.get('n_rkhs')} depth{arch.get('n_depth')}"
    return name


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples as lists), so a config tuple equals a file's list."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def check_architecture(
    found: Mapping[str, Any], expected: Mapping[str, Any] | None, *, where: str
) -> None:
    """Raises ``ArchitectureMismatchError`` unless ``found`` has every key ``expected`` states.

    A key the file does not state takes the module's default (``width`` 1 for a ResNet), so
    ``{"name": "resnet", "depth": 50, "width": 1}`` matches a file written without ``width``.

    Args:
      found: the file's architecture (``read_architecture``).
      expected: the zoo entry's architecture, or ``None`` (nothing to check).
      where: the file, named in the message with the zoo entry.
    """
    if not expected:
        return
    expected, found = _plain(expected), _plain(found)
    cls = ARCHITECTURES.get(found.get("name"))
    fields = getattr(cls, "__dataclass_fields__", {})
    defaults = {k: _plain(f.default) for k, f in fields.items() if k not in ("parent", "name")}
    differing = [
        key
        for key, want in expected.items()
        if found.get(key, defaults.get(key, dataclasses.MISSING)) != want
    ]
    if differing:
        shown = ", ".join(f"{k}={found.get(k, defaults.get(k, '<absent>'))!r}" for k in differing)
        raise ArchitectureMismatchError(
            f"{where} holds a {architecture_name(found)} ({shown}) but its model zoo entry "
            f"expects a {architecture_name(expected)} ({expected}); the file is probably another "
            "model's: convert the right checkpoint to this name, or fix the zoo entry"
        )


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


def load(path: str | os.PathLike, *, expected: Mapping[str, Any] | None = None) -> Encoder:
    """Reads a converted encoder file (see ``jretrieval.models.io``) and validates its shapes.

    Args:
      path: the ``.h5`` file.
      expected: the architecture its zoo entry states (``check_architecture``), checked from
        the file's metadata before any weight is read; ``None`` checks nothing.

    Returns:
      The encoder; ``metadata`` gains ``file`` (the path) and ``file_sha256`` (the file's
      digest) for the results' provenance.

    Raises:
      ArchitectureMismatchError: the file holds another architecture (both named).
      FileNotFoundError, ValueError: missing or malformed file (named).
    """
    check_architecture(read_architecture(path), expected, where=os.fspath(path))
    architecture, variables, preprocessing, metadata = io.read(path)
    check_variables(architecture, variables, where=os.fspath(path))
    metadata = {**metadata, "file": os.fspath(path), "file_sha256": io.file_sha256(path)}
    return Encoder(
        module=build(architecture),
        variables=jax.tree.map(jnp.asarray, variables),
        architecture=architecture,
        preprocessing=preprocessing,
        metadata=metadata,
    )


def provenance(encoder: Encoder) -> dict[str, Any]:
    """What a results file records about an encoder: architecture and weight digests.

    Returns:
      ``{"architecture": {...}, "architecture_name": str, "weights_file": path | None,
      "weights_sha256": the file's SHA-256 | None, "checkpoint": source checkpoint | None,
      "checkpoint_sha256": its SHA-256 | None, "seed": int | None}`` (``seed`` for a random
      initialisation, which has no file).
    """
    meta = encoder.metadata
    return {
        "architecture": dict(encoder.architecture),
        "architecture_name": architecture_name(encoder.architecture),
        "weights_file": meta.get("file"),
        "weights_sha256": meta.get("file_sha256"),
        "checkpoint": meta.get("source") if meta.get("source") != "random init" else None,
        "checkpoint_sha256": meta.get("sha256"),
        "seed": meta.get("seed") if meta.get("source") == "random init" else None,
    }
