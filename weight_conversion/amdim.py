"""AMDIM (Philip-Bachman/amdim-public) checkpoints to :class:`jretrieval.models.amdim.AMDIMEncoder`.

The released files (``amdim_ndf256_rkhs2048_rd10.pth``, ``amdim_ndf320_rkhs2560_rd10.pth``) are
``{'model': state_dict, 'hyperparams': {ndf, n_classes, n_rkhs, tclip, n_depth, encoder_size,
use_bn}, 'cursor': {...}}``. The encoder sits inside ``nn.DataParallel`` inside the model, so its
keys start with ``encoder.module.layer_list.``; those are kept (371 keys for rd 10: 318 tensors
and 53 ``num_batches_tracked``). Dropped: the loss-embedding heads ``encoder.module.rkhs_block_*``,
``g2l_loss.*`` (a uint8 mask), ``evaluator.*``, every ``num_batches_tracked`` and the cursor.
Conv weights go OIHW -> HWIO, BN ``weight``/``bias`` to ``params`` ``scale``/``bias`` and the
running statistics to ``batch_stats`` ``mean``/``var``; the ``MaybeBatchNorm2d`` wrapper's
``.bn`` disappears from the path. fp16 tensors (apex AMP O2 training) are upcast to float32.

The expected keys and shapes are enumerated from the hyperparameters (:func:`layout`), so a file
with any missing, unexpected or mis-shaped encoder key is refused with the full list; the result
is then checked against ``jax.eval_shape`` of the module's init (``models.check_variables``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from absl import logging

from jretrieval import models
from jretrieval.models.amdim import RES_BLOCKS
from weight_conversion.checkpoint import to_numpy

#: prefixes of the encoder keys (DataParallel-wrapped as saved by train.py, or unwrapped).
ENCODER_PREFIXES = ("encoder.module.layer_list.", "encoder.layer_list.")
#: prefixes of everything else the original Model saves; dropped.
DROPPED_PREFIXES = ("encoder.module.rkhs_block_", "encoder.rkhs_block_", "g2l_loss.", "evaluator.")
_BN = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


class Entry(NamedTuple):
    """Where one torch tensor goes: Flax collection, path in it, and the torch shape."""

    collection: str
    path: tuple[str, ...]
    shape: tuple[int, ...]


def layout(ndf: int, n_rkhs: int, n_depth: int) -> dict[str, Entry]:
    """Every encoder tensor, keyed as in the file after ``encoder.module.``, in file order.

    For example ``"layer_list.2.layer_list.0.conv1.weight"`` ->
    ``Entry("params", ("layer_list_2", "layer_list_0", "conv1", "kernel"), (2ndf, ndf, 4, 4))``.
    ``num_batches_tracked`` is not listed: 78 entries for n_depth 2, 318 for n_depth 10.
    """
    out: dict[str, Entry] = {}

    def conv(key: str, path: tuple[str, ...], shape: tuple[int, ...], bias: bool) -> None:
        out[f"{key}.weight"] = Entry("params", (*path, "kernel"), shape)
        if bias:
            out[f"{key}.bias"] = Entry("params", (*path, "bias"), shape[:1])

    def bn(key: str, path: tuple[str, ...], n: int) -> None:
        for name, (collection, leaf) in _BN.items():
            out[f"{key}.bn.{name}"] = Entry(collection, (*path, leaf), (n,))

    def res_unit(key: str, path: tuple[str, ...], n_in: int, n_out: int, k: int) -> None:
        conv(f"{key}.conv1", (*path, "conv1"), (n_out, n_in, k, k), False)
        conv(f"{key}.conv2", (*path, "conv2"), (n_out, n_out, 1, 1), False)
        bn(f"{key}.bn1", (*path, "bn1"), n_out)

    conv("layer_list.0.conv", ("layer_list_0", "conv"), (ndf, 3, 5, 5), True)
    conv("layer_list.1.conv", ("layer_list_1", "conv"), (ndf, ndf, 3, 3), True)
    for index, n_in, n_out, kernel, _ in RES_BLOCKS:
        if index == 6:
            bn("layer_list.5", ("layer_list_5",), 8 * ndf)
        for j in range(n_depth):
            res_unit(
                f"layer_list.{index}.layer_list.{j}",
                (f"layer_list_{index}", f"layer_list_{j}"),
                (n_in if j == 0 else n_out) * ndf,
                n_out * ndf,
                kernel if j == 0 else 1,
            )
    res_unit("layer_list.8", ("layer_list_8",), 8 * ndf, n_rkhs, 3)
    bn("layer_list.9", ("layer_list_9",), n_rkhs)
    return out


def architecture_from_hyperparams(hyperparams: Mapping[str, Any]) -> dict[str, Any]:
    """``{"name": "amdim", "ndf", "n_rkhs", "n_depth", "use_bn", "feature_layer": 7}``."""
    missing = [k for k in ("ndf", "n_rkhs", "n_depth") if k not in hyperparams]
    if missing:
        raise ValueError(
            f"AMDIM checkpoint: hyperparams lack {missing}; got keys {sorted(hyperparams)}"
        )
    size = hyperparams.get("encoder_size", 128)
    if int(size) != 128:
        raise ValueError(
            f"AMDIM checkpoint: hyperparams encoder_size={size}; only the 128 px (IN128) "
            "encoder is supported"
        )
    if "use_bn" not in hyperparams:
        logging.warning("AMDIM checkpoint: hyperparams lack use_bn; assuming False")
    arch = {
        "name": "amdim",
        "ndf": int(hyperparams["ndf"]),
        "n_rkhs": int(hyperparams["n_rkhs"]),
        "n_depth": int(hyperparams["n_depth"]),
        "use_bn": bool(hyperparams.get("use_bn", False)),
        "feature_layer": 7,
    }
    if arch["n_depth"] < 1 or arch["ndf"] < 1 or arch["n_rkhs"] < 8 * arch["ndf"]:
        raise ValueError(
            f"AMDIM checkpoint: hyperparams ndf={arch['ndf']}, n_rkhs={arch['n_rkhs']}, "
            f"n_depth={arch['n_depth']}; expected n_depth >= 1 and n_rkhs >= 8 * ndf >= 8"
        )
    return arch


def _split_keys(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Encoder tensors keyed ``layer_list.*`` (prefix stripped) and the keys nothing explains."""
    encoder, unexpected = {}, []
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked") or key.startswith(DROPPED_PREFIXES):
            continue
        prefix = next((p for p in ENCODER_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            unexpected.append(key)
        else:
            encoder["layer_list." + key[len(prefix) :]] = value
    return encoder, unexpected


def convert(obj: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """Converts what ``torch.load(weights_only=True)`` returned for an AMDIM checkpoint.

    Args:
      obj: ``{'model': state_dict, 'hyperparams': {...}, 'cursor': ...}`` (amdim-public
        ``checkpoint.py``).

    Returns:
      ``(architecture, variables, preprocessing)``: the ``AMDIMEncoder`` kwargs with
      ``"name": "amdim"``; ``{"params": ..., "batch_stats": ...}`` as nested dicts of float32
      NumPy arrays (HWIO kernels; possibly views into the checkpoint's tensors); ImageNet
      mean/std for RGB in [0, 1].

    Raises:
      ValueError: not an AMDIM checkpoint, bad hyperparameters, or a missing, unexpected or
        mis-shaped encoder key (all of them listed).
    """
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
        got = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"AMDIM checkpoint: expected a dict with 'model' (a state_dict) and 'hyperparams' "
            f"(amdim-public checkpoint.py layout); got {got}"
        )
    if not isinstance(obj.get("hyperparams"), Mapping):
        raise ValueError(
            f"AMDIM checkpoint: 'hyperparams' is {type(obj.get('hyperparams')).__name__}; "
            "expected a dict with ndf, n_rkhs, n_depth, use_bn"
        )
    arch = architecture_from_hyperparams(obj["hyperparams"])
    expected = layout(arch["ndf"], arch["n_rkhs"], arch["n_depth"])
    encoder, unexpected = _split_keys(obj["model"])
    unexpected += [f"encoder.module.{k}" for k in encoder if k not in expected]
    missing = [f"encoder.module.{k}" for k in expected if k not in encoder]
    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in encoder.items()}
    misshaped = [
        f"encoder.module.{k}: {shapes[k]} (expected {entry.shape})"
        for k, entry in expected.items()
        if k in shapes and shapes[k] != entry.shape
    ]
    if missing or unexpected or misshaped:
        raise ValueError(
            f"AMDIM checkpoint does not match ndf={arch['ndf']}, n_rkhs={arch['n_rkhs']}, "
            f"n_depth={arch['n_depth']}: missing {missing}; unexpected {unexpected}; "
            f"mis-shaped {misshaped}"
        )
    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, entry in expected.items():
        array = to_numpy(encoder[key], key=f"encoder.module.{key}")
        if array.ndim == 4:
            array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        node = variables[entry.collection]
        for name in entry.path[:-1]:
            node = node.setdefault(name, {})
        node[entry.path[-1]] = array
    models.check_variables(arch, variables, where="AMDIM checkpoint")
    logging.info(
        "AMDIM: kept %d encoder tensors of %d keys (ndf=%d, n_rkhs=%d, n_depth=%d, use_bn=%s)",
        len(expected),
        len(obj["model"]),
        arch["ndf"],
        arch["n_rkhs"],
        arch["n_depth"],
        arch["use_bn"],
    )
    return (
        arch,
        variables,
        {"mean": list(models.IMAGENET["mean"]), "std": list(models.IMAGENET["std"])},
    )
