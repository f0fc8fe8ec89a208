"""torchvision / SimCLR (tonylins) / MoCo ResNet checkpoints -> ``jretrieval.models.resnet``.

Shape convention: torch convs OIHW ``[out, in, kh, kw]`` become Flax HWIO ``[kh, kw, in, out]``;
Linear ``[out, in]`` becomes Dense ``[in, out]``; BatchNorm ``weight/bias`` go to
``params/{scale,bias}``, ``running_mean/var`` to ``batch_stats/{mean,var}``.

The mapping is a list of explicit regexes (``RULES``), matched against every key by name, never
by position (SimCLR registers ``downsample`` before ``conv1``). Arrays stay views of the
checkpoint's memory where possible (float32 transposes are views), so a conversion holds little
more than the loaded checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from jretrieval.models import IDENTITY, IMAGENET, check_variables
from jretrieval.models.io import unflatten
from jretrieval.models.resnet import STAGE_SIZES
from weight_conversion.checkpoint import to_numpy

BN_FIELDS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_BN = r"(weight|bias|running_mean|running_var)"


def _conv(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (2, 3, 1, 0))


def _dense(a: np.ndarray) -> np.ndarray:
    return a.T


def _same(a: np.ndarray) -> np.ndarray:
    return a


#: (regex on the torch key, Flax path with {0}, {1}... from the groups, how to reshape).
Rule = tuple[str, str, Callable[[np.ndarray], np.ndarray]]
RULES: list[Rule] = [
    (r"conv1\.weight", "params/conv1/kernel", _conv),
    (rf"bn1\.{_BN}", "bn:bn1/{0}", _same),
    (r"layer(\d)\.(\d+)\.(conv[123])\.weight", "params/layer{0}_{1}/{2}/kernel", _conv),
    (rf"layer(\d)\.(\d+)\.(bn[123])\.{_BN}", "bn:layer{0}_{1}/{2}/{3}", _same),
    (
        r"layer(\d)\.(\d+)\.downsample\.0\.weight",
        "params/layer{0}_{1}/downsample_conv/kernel",
        _conv,
    ),
    (rf"layer(\d)\.(\d+)\.downsample\.1\.{_BN}", "bn:layer{0}_{1}/downsample_bn/{2}", _same),
]
#: keys that are never part of the encoder.
ALWAYS_DROP = r".*num_batches_tracked"


def _target(template: str, groups: tuple[str, ...]) -> str:
    path = template.format(*groups)
    if path.startswith("bn:"):
        *module, field = path[3:].split("/")
        collection, name = BN_FIELDS[field]
        return "/".join([collection, *module, name])
    return path


def map_keys(
    state: Mapping[str, Any], rules: Iterable[Rule], *, drop: str = ALWAYS_DROP
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Applies ``rules`` to every key of ``state`` (already stripped of wrappers).

    Returns ``({"params/conv1/kernel": array, ...}, unexpected torch keys)``; keys matching
    ``drop`` are skipped. Two torch keys mapping to one Flax path raise ``ValueError``.
    """
    compiled = [(re.compile(pattern), template, fn) for pattern, template, fn in rules]
    dropper = re.compile(drop)
    flat: dict[str, np.ndarray] = {}
    unexpected = []
    for key, value in state.items():
        if dropper.fullmatch(key):
            continue
        for regex, template, fn in compiled:
            match = regex.fullmatch(key)
            if match:
                path = _target(template, match.groups())
                if path in flat:
                    raise ValueError(f"checkpoint key {key!r} maps to {path!r} a second time")
                flat[path] = fn(to_numpy(value, key=key))
                break
        else:
            unexpected.append(key)
    return flat, unexpected


def finish(
    architecture: dict[str, Any],
    flat: Mapping[str, np.ndarray],
    unexpected: list[str],
    *,
    where: str,
) -> dict[str, Any]:
    """Nests ``flat`` and checks it against the model; one ``ValueError`` lists every problem."""
    variables = unflatten(flat)
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected checkpoint keys: {sorted(unexpected)}")
    try:
        check_variables(architecture, variables, where=where)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ValueError(f"refusing {where}:\n" + "\n".join(problems))
    return variables


def infer_resnet(state: Mapping[str, Any], *, where: str) -> dict[str, int]:
    """``{"depth": d, "width": w}`` from the block counts and ``conv1.weight`` of a state dict."""
    blocks: dict[int, int] = {}
    for key in state:
        match = re.match(r"layer(\d)\.(\d+)\.", key)
        if match:
            stage, block = int(match[1]), int(match[2])
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    sizes = tuple(blocks.get(i, 0) for i in (1, 2, 3, 4))
    depths = [d for d, s in STAGE_SIZES.items() if s == sizes]
    if not depths or "conv1.weight" not in state:
        raise ValueError(
            f"{where}: not a supported bottleneck ResNet: blocks per stage {sizes}, "
            f"conv1.weight {'present' if 'conv1.weight' in state else 'absent'}; expected "
            f"{ {d: s for d, s in STAGE_SIZES.items()} }"
        )
    stem = int(state["conv1.weight"].shape[0])
    if stem % 64:
        raise ValueError(f"{where}: conv1.weight has {stem} filters; expected a multiple of 64")
    return {"depth": depths[0], "width": stem // 64}


def strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Keys starting with ``prefix`` with it removed; the others unchanged."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def _state_dict(obj: Mapping[str, Any], *, fmt: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{fmt} checkpoint is a {type(obj).__name__}; expected a dict")
    if "state_dict" in obj:
        return obj["state_dict"]
    return obj


def _convert_plain(obj: Mapping[str, Any], *, fmt: str, preprocessing: dict) -> tuple:
    state = strip(_state_dict(obj, fmt=fmt), "module.")
    where = f"{fmt} checkpoint"
    architecture = {"name": "resnet", **infer_resnet(state, where=where)}
    state = {k: v for k, v in state.items() if not re.fullmatch(r"fc\.(weight|bias)", k)}
    flat, unexpected = map_keys(state, RULES)
    return architecture, finish(architecture, flat, unexpected, where=where), dict(preprocessing)


def convert_torchvision(obj: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """A torchvision ``state_dict`` (bare, or under ``state_dict``, ``module.`` stripped).

    Returns ``(architecture, variables, preprocessing)``; ``fc`` and ``num_batches_tracked`` are
    dropped; ImageNet mean/std.
    """
    return _convert_plain(obj, fmt="torchvision", preprocessing=IMAGENET)


def convert_simclr(obj: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """tonylins/simclr-converter ``{"state_dict": ...}``, width from ``conv1``; RGB in [0,1]."""
    return _convert_plain(obj, fmt="simclr", preprocessing=IDENTITY)


_MOCO_PREFIXES = ("module.encoder_q.", "encoder_q.")
_MOCO_DROP = re.compile(r"(module\.)?(encoder_k\..*|queue|queue_ptr)")


def convert_moco(obj: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """MoCo v1/v2 ``{"state_dict": ...}`` in the training or the released layout.

    Keeps ``[module.]encoder_q.*`` minus its ``fc`` head (v1 ``fc.*``, v2 ``fc.0/fc.2``), as
    ``main_lincls.py`` does; drops ``encoder_k``, ``queue``, ``queue_ptr``; anything else is
    unexpected. ImageNet mean/std.
    """
    state = _state_dict(obj, fmt="moco")
    kept, unexpected = {}, []
    for key, value in state.items():
        prefix = next((p for p in _MOCO_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            name = key[len(prefix) :]
            if not name.startswith("fc."):
                kept[name] = value
        elif not _MOCO_DROP.fullmatch(key):
            unexpected.append(key)
    where = "moco checkpoint"
    if not kept:
        raise ValueError(f"{where}: no key starts with {_MOCO_PREFIXES}; got {list(state)[:5]}...")
    architecture = {"name": "resnet", **infer_resnet(kept, where=where)}
    flat, more = map_keys(kept, RULES)
    variables = finish(architecture, flat, unexpected + more, where=where)
    return architecture, variables, dict(IMAGENET)
