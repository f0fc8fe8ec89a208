"""Folding inference-mode BatchNorm into the convolution before it, once per model.

Shape convention: conv kernels are HWIO ``[kh, kw, Cin, Cout]``; BatchNorm variables and conv
biases are ``[Cout]``; maps NHWC as everywhere.

In inference BN is a per-channel affine map of the conv's output,
``bn(conv(x, W) + b) = conv(x, W) * s + (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``, so the pair is one conv with kernel ``W * s`` (scaled on the
output axis) and bias ``beta + (b - mean) * s``. Folded, the encoder reads one kernel and runs
no separate normalisation pass over every map (and, in bfloat16, rounds once instead of twice).

The BN statistics are frozen by folding: fold **after** BN recalibration
(``experiment.recalibrate`` / ``extract.recalibrate_bn``), never before; a folded module refuses
to run in training mode. Which pairs fold is decided by the folded module itself (``fold_bn=True``
on ``ResNet``/``APGeM``/``AMDIMEncoder``): every conv that gains a bias there is paired with the
BatchNorm named like it (``conv1`` -> ``bn1``, ``downsample_conv`` -> ``downsample_bn``). BNs
that follow a residual sum rather than a conv (AMDIM layers 5 and 9) stay BatchNorms.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jretrieval.models import io
from jretrieval.models.encoder import INIT_SIZE
from jretrieval.models.resnet import BN_EPSILON


def fold_conv_bn(
    kernel: np.ndarray,
    conv_bias: np.ndarray | None,
    scale: np.ndarray,
    bias: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float = BN_EPSILON,
) -> tuple[np.ndarray, np.ndarray]:
    """``(kernel [kh, kw, Cin, Cout], bias [Cout])`` of the conv equal to ``bn(conv(x))``,
    computed in float64 and returned in float32."""
    s = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    b = 0.0 if conv_bias is None else np.asarray(conv_bias, np.float64)
    new_kernel = np.asarray(kernel, np.float64) * s
    new_bias = np.asarray(bias, np.float64) + (b - np.asarray(mean, np.float64)) * s
    return new_kernel.astype(np.float32), new_bias.astype(np.float32)


def _bn_name(conv_path: str) -> str:
    parent, _, leaf = conv_path.rpartition("/")
    if "conv" not in leaf:
        raise ValueError(f"fold_batch_norm: cannot name the BatchNorm of conv {conv_path!r}")
    return f"{parent}/{leaf.replace('conv', 'bn')}" if parent else leaf.replace("conv", "bn")


def fold_variables(module: Any, variables: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(folded module, folded variables)`` for a module with a ``fold_bn`` field.

    Raises ``ValueError`` if the module cannot fold or a BatchNorm's variables are missing.
    """
    if "fold_bn" not in getattr(module, "__dataclass_fields__", {}):
        raise ValueError(f"fold_batch_norm: {type(module).__name__} has no fold_bn field")
    if module.fold_bn:
        return module, variables
    folded = module.clone(fold_bn=True)
    x = jax.ShapeDtypeStruct((1, INIT_SIZE, INIT_SIZE, 3), jnp.float32)
    want = io.flatten(jax.eval_shape(folded.init, jax.random.key(0), x))
    flat = io.flatten(variables)
    out = dict(flat)
    for path in want:
        if not (path.startswith("params/") and path.endswith("/bias")):
            continue
        conv = path[len("params/") : -len("/bias")]
        if f"params/{conv}/bias" in flat:
            continue  # a conv that had a bias already (AMDIM layers 0, 1): not folded
        bn = _bn_name(conv)
        keys = [f"params/{bn}/scale", f"params/{bn}/bias"]
        keys += [f"batch_stats/{bn}/mean", f"batch_stats/{bn}/var"]
        missing = [k for k in [f"params/{conv}/kernel", *keys] if k not in flat]
        if missing:
            raise ValueError(f"fold_batch_norm: conv {conv!r} has no {missing} to fold")
        scale, bias, mean, var = (np.asarray(flat[k]) for k in keys)
        kernel, new_bias = fold_conv_bn(flat[f"params/{conv}/kernel"], None, scale, bias, mean, var)
        out[f"params/{conv}/kernel"], out[path] = kernel, new_bias
        for k in keys:
            del out[k]
    collections = {path.split("/", 1)[0] for path in want}
    kept = {k for k in out if k.split("/", 1)[0] in collections}
    if kept != set(want):
        raise ValueError(
            f"fold_batch_norm: folded variables do not match {type(folded).__name__}: missing "
            f"{sorted(set(want) - kept)}, unexpected {sorted(kept - set(want))}"
        )
    misshaped = [k for k in want if tuple(np.shape(out[k])) != tuple(want[k].shape)]
    if misshaped:
        raise ValueError(f"fold_batch_norm: mis-shaped after folding: {misshaped}")
    return folded, jax.tree.map(jnp.asarray, io.unflatten(out))


def fold_batch_norm(encoder: Any) -> Any:
    """The encoder with every conv + BatchNorm pair folded into one conv (``fold_bn=True``).

    Call it after BN recalibration and before ``with_dtype``/``make_step``: the result computes
    the same maps (to float32 rounding) in inference mode only. ``architecture`` gains
    ``"fold_bn": True`` (so saved files rebuild the folded module) and ``metadata``
    ``"bn_folded": True``. An encoder already folded, or whose module has no ``fold_bn`` field
    (a module of the caller's own), is returned as it is.
    """
    if "fold_bn" not in getattr(encoder.module, "__dataclass_fields__", {}):
        return encoder  # a module of the caller's own (no fold_bn field): run as it is
    if encoder.module.fold_bn:
        return encoder
    module, variables = fold_variables(encoder.module, dict(encoder.variables))
    return encoder.replace(
        module=module,
        variables=variables,
        architecture={**encoder.architecture, "fold_bn": True},
        metadata={**encoder.metadata, "bn_folded": True},
    )
