"""naver dirtorch AP-GeM checkpoints -> ``jretrieval.models.apgem.APGeM``.

Shape convention: as in ``weight_conversion.resnet`` (OIHW -> HWIO, Linear transposed);
``adpool.p`` ``[1]`` -> ``params/adpool/p``; ``fc.weight [D, 2048]`` -> ``params/fc/kernel
[2048, D]``. The sklearn PCA under ``checkpoint["pca"]`` (read by the restricted unpickler as a
``PCAStub``) becomes the ``"pca"`` collection: ``mean [D]``, ``components [K, D]``,
``explained_variance [K]``; its ``whiten`` flag goes to ``architecture["pca_whiten"]``.

File layout (dirtorch ``save_checkpoint``): ``{"state_dict": {"module.conv1.weight": ...,
"module.adpool.p": ..., "module.fc.weight": ..., "module.fc.bias": ...}, "model_options":
{"arch": "resnet101_rmac", "out_dim": 2048, "pooling": "gem", "gemp": 3}, "pca":
{"Landmarks_clean": PCA}, "current_iter": ...}``; ``optimizer``/``preprocess`` may be present.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from jretrieval.models import IMAGENET
from weight_conversion import resnet
from weight_conversion.checkpoint import to_numpy

#: dirtorch architectures with exactly this layout (the FPN variants have extra convs).
ARCHS = {"resnet50_rmac": 50, "resnet101_rmac": 101, "resnet152_rmac": 152}
#: the PCA that dirtorch's ``test_dir.py`` applies by default.
DEFAULT_PCA = "Landmarks_clean"

RULES: list[resnet.Rule] = [
    *resnet.RULES,
    (r"adpool\.p", "params/adpool/p", resnet._same),
    (r"fc\.weight", "params/fc/kernel", resnet._dense),
    (r"fc\.bias", "params/fc/bias", resnet._same),
]


def _pca(entries: Any, *, where: str) -> tuple[dict[str, np.ndarray], bool] | None:
    """The chosen PCA's arrays and ``whiten`` flag, or ``None`` when the file has none."""
    if not entries:
        logging.warning("%s has no 'pca' entry; converting without the shipped whitening", where)
        return None
    if not isinstance(entries, Mapping):
        raise ValueError(f"{where}: 'pca' is a {type(entries).__name__}; expected a dict")
    if DEFAULT_PCA in entries:
        name = DEFAULT_PCA
    elif len(entries) == 1:
        (name,) = entries
    else:
        raise ValueError(f"{where}: 'pca' holds {list(entries)}; expected {DEFAULT_PCA!r}")
    state = getattr(entries[name], "__dict__", entries[name])
    if not isinstance(state, Mapping):
        raise ValueError(f"{where}: pca[{name!r}] is a {type(entries[name]).__name__}")
    fields = {
        "mean": "mean_",
        "components": "components_",
        "explained_variance": "explained_variance_",
    }
    missing = [f for f in [*fields.values(), "whiten"] if f not in state]
    if missing:
        raise ValueError(f"{where}: pca[{name!r}] lacks {missing}; has {sorted(state)}")
    arrays = {k: to_numpy(state[f], key=f"pca.{name}.{f}") for k, f in fields.items()}
    return arrays, bool(state["whiten"])


def convert(obj: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """Returns ``(architecture, variables, preprocessing)`` for a dirtorch AP-GeM checkpoint."""
    where = "apgem checkpoint"
    if not isinstance(obj, Mapping) or "state_dict" not in obj:
        got = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{where}: expected a dict with 'state_dict'; got {got}")
    options = obj.get("model_options") or {}
    arch = options.get("arch")
    if arch is not None and arch not in ARCHS:
        raise ValueError(
            f"{where}: model_options['arch'] = {arch!r}; expected one of {list(ARCHS)} "
            "(the FPN variants are not supported)"
        )
    if options.get("pooling", "gem") != "gem":
        raise ValueError(
            f"{where}: model_options['pooling'] = {options['pooling']!r}; expected 'gem'"
        )
    state = resnet.strip(obj["state_dict"], "module.")
    shape = resnet.infer_resnet(state, where=where)
    if arch is not None and shape["depth"] != ARCHS[arch]:
        raise ValueError(f"{where}: arch {arch!r} but the keys hold a ResNet-{shape['depth']}")
    if "fc.weight" not in state:
        raise ValueError(f"{where}: no 'fc.weight' (AP-GeM's 2048x2048 projection)")
    out_dim = int(state["fc.weight"].shape[0])
    pca = _pca(obj.get("pca"), where=where)
    architecture: dict[str, Any] = {"name": "apgem", **shape, "out_dim": out_dim}
    flat, unexpected = resnet.map_keys(state, RULES)
    if pca is not None:
        arrays, whiten = pca
        architecture["pca_dim"] = int(arrays["components"].shape[0])
        architecture["pca_whiten"] = whiten
        flat.update({f"pca/{k}": v for k, v in arrays.items()})
    variables = resnet.finish(architecture, flat, unexpected, where=where)
    preprocessing = dict(IMAGENET)
    custom = obj.get("preprocess")
    if isinstance(custom, Mapping) and {"mean", "std"} <= set(custom):
        preprocessing = {"mean": list(custom["mean"]), "std": list(custom["std"])}
    return architecture, variables, preprocessing
