"""Which checkpoint family a loaded checkpoint belongs to, from its keys alone.

Shape convention: none (only key names are read; tensors are not touched).

| format | top level | state dict keys |
| --- | --- | --- |
| amdim | ``{"model", "hyperparams", ...}`` | ``encoder.module.layer_list.*`` |
| moco | ``{"state_dict", ...}`` | ``[module.]encoder_q.*`` (+ ``encoder_k``, queue) |
| apgem | ``{"state_dict", "model_options", "pca", ...}`` | ``module.*`` incl. ``adpool.p`` |
| simclr | ``{"state_dict"}`` | torchvision names, no prefix |
| torchvision | the bare state dict | ``conv1.weight``, ``layer1.0.*`` ... |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _sample(keys: list[str]) -> str:
    return f"{keys[:6]}{'...' if len(keys) > 6 else ''} ({len(keys)} keys)"


def detect(obj: Any) -> str:
    """One of ``"amdim"``, ``"moco"``, ``"apgem"``, ``"simclr"``, ``"torchvision"``.

    Raises ``ValueError`` with the top-level keys when no layout matches.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}; expected a dict of tensors")
    top = [str(k) for k in obj]
    model = obj.get("model")
    if isinstance(model, Mapping) and "hyperparams" in obj:
        if any(str(k).startswith("encoder.module.layer_list.") for k in model):
            return "amdim"
    state = obj.get("state_dict")
    if isinstance(state, Mapping):
        keys = [str(k) for k in state]
        if any(k.startswith(("module.encoder_q.", "encoder_q.")) for k in keys):
            return "moco"
        if "model_options" in obj or any(k.endswith("adpool.p") for k in keys):
            return "apgem"
        if "conv1.weight" in keys or "module.conv1.weight" in keys:
            return "simclr"
        raise ValueError(
            f"cannot detect the checkpoint format: 'state_dict' keys {_sample(keys)}; pass "
            "--format explicitly"
        )
    if "conv1.weight" in top or "module.conv1.weight" in top:
        return "torchvision"
    raise ValueError(
        f"cannot detect the checkpoint format from top-level keys {_sample(top)}; expected a "
        "torchvision state dict, {'state_dict': ...} (simclr, moco, apgem) or {'model', "
        "'hyperparams'} (amdim)"
    )
